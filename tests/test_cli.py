from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hf_safety_merge.cli import main


def test_help_is_followable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("merge", "vector", "methods", "demo", "task_reference", "examples:"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["vector", "compute", "--help"])
    assert "--aligned" in capsys.readouterr().out


def test_other_commands_skip_the_heavier_parsers() -> None:
    """A command line builds only its command's parser: `merge` parses without importing the
    evaluation package or the distillation script (~0.08 s of start-up); the full parser and the
    top-level help still have every command."""
    code = (
        "import sys; from hf_safety_merge.cli import build_parser, main\n"
        "try:\n    main(['merge', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('hf_safety_merge.eval', 'hf_safety_merge.distill'))))\n"
        "p = build_parser(); a = p.parse_args(['eval', '--model', 'm']); print(a.command, callable(a.func))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    assert lines[-2] == "[]", lines[-2]
    assert lines[-1] == "eval True"
    r = subprocess.run([sys.executable, "-m", "hf_safety_merge.cli", "--help"], capture_output=True, text=True, check=True)
    for word in ("distill", "eval", "judge"):
        assert f"    {word}" in r.stdout, word


def test_console_script_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "hf_safety_merge.cli", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("hf-safety-merge ")


def test_only_the_process_command_line_takes_the_fast_exit() -> None:
    """`main()` on the process's own command line freezes the garbage collector's objects as it
    returns (the process exits next: shutdown then skips walking them); `main(argv)`, the form
    a caller inside a longer-lived process uses, leaves the collector alone."""
    code = ("import gc, sys; from hf_safety_merge.cli import main; main(['methods']); a = gc.get_freeze_count(); "
            "sys.argv = ['hf-safety-merge', 'methods']; rc = main(); print(a, gc.get_freeze_count() > 0, rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == "0 True 0"


def test_import_pauses_the_garbage_collector_and_restores_the_callers_setting() -> None:
    """No full collection runs while the package (and torch) is imported, and no young one
    waits for the end of it: the objects the import made are in the oldest generation (on the
    previous code, the ~300k objects sat in generation 0 and the first allocation after the
    import walked them all, 0.10 s); the collector is on afterwards when it was on before, and
    stays off when the caller had turned it off. Objects the caller froze stay frozen."""
    code = ("import gc, sys; full = []; gc.callbacks.append(lambda p, i: full.append(1) if p == 'start' and "
            "i['generation'] == 2 else None); on = sys.argv[1] == 'on'; on or gc.disable(); keep = [[]]; "
            "sys.argv[2] == 'frozen' and gc.freeze(); f0 = gc.get_freeze_count();  import hf_safety_merge; "
            "young = len(gc.get_objects(0)) + len(gc.get_objects(1)); "
            "print(len(full), gc.isenabled(), young < 5000 if f0 == 0 else young > 100000, "
            "(id(keep) in {id(o) for o in gc.get_objects()}) == (f0 == 0))")
    for setting, frozen, expected in (("on", "-", "0 True True True"), ("off", "-", "0 False True True"),
                                      ("on", "frozen", "0 True True True")):
        r = subprocess.run([sys.executable, "-c", code, setting, frozen], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.splitlines()[-1] == expected, (setting, frozen, r.stdout)


def test_vector_compute_and_merge_from_cli(llama_family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vector", "compute", "--aligned", str(llama_family["aligned"]), "--reference", str(llama_family["harmful"]),
                 "--out", str(tmp_path / "v"), "--scope", "attention", "--dtype", "bfloat16", "--no-progress"]) == 0
    assert "wrote SafetyVector" in capsys.readouterr().out
    assert main(["vector", "info", str(tmp_path / "v")]) == 0
    info = capsys.readouterr().out
    assert '"dtype": "bfloat16"' in info and "self_attn" in info
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"task_model: {llama_family['task']}\ntask_reference: {llama_family['aligned']}\n"
        f"safety_vector: {tmp_path / 'v'}\nmethod: enchtable\nparameters:\n  beta: 0.1\n"
    )
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--dtype", "float32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Merged with enchtable: 16/39 tensors" in out and "alpha:" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert main(["methods"]) == 0
    assert "enchtable" in capsys.readouterr().out


def test_demo_quick_shows_refusal_before_and_after(tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_space_dir: Path) -> None:
    """The toy models (cached after the first build): a harmful prompt answered by the task
    fine-tune and refused once patched with EnchTable, a benign one answered by both; no nan.
    (`toy_space_dir` builds the cached toy family once for the whole session.)"""
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows: dict[str, str] = {}
    for line in out.splitlines():  # the first table: the example answers
        if line.startswith("| ") and "prompt" not in line:
            rows.setdefault(line.split("|")[1].strip(), line)
    before, after = rows["task fine-tune (before)"], rows["patched: enchtable"]
    assert before.split("|")[2].strip().startswith("ANSWERED") and after.split("|")[2].strip().startswith("REFUSED")
    assert before.split("|")[3].strip().startswith("ANSWERED") and after.split("|")[3].strip().startswith("ANSWERED")
    assert "nan" not in out and "generated token ids" not in out
    assert (tmp_path / "demo" / "patched-enchtable" / "README.md").is_file()


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    from hf_safety_merge.cli import EPILOG

    for argv, words in (
        (["eval", "--help"], ["95% Wilson", "--fail-above", "--update-card"]),
        (["demo", "--help"], ["Q4_1 GGUF", "dequantised", "folder for the stages"]),
        (["push", "--help"], ["REPO_ID", "LOCAL_PATH", "--commit-message", "--token", "--include", "the folder to push"]),
        (["merge", "--help"], ["mergekit", "OUT", "--cuda", "--out-shard-size"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        for w in words:
            assert w in text, (argv, w)
        assert "95%%" not in text
        if argv[0] == "merge":
            assert EPILOG.splitlines()[1] not in text  # the top-level epilog is not repeated
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "so a merge is reproducible." in out  # DARE's description, whole
    assert "beta: float in (0, 100] or None = None" in out and "Default 0.1 unless `alpha` is given" in out
    assert "alpha: float > 0 or None = None" in out and "one of 'svd', 'gram'" in out
    assert "density: float in (0, 1] = 0.5" in out and "fraction of entries kept" in out


def test_top_level_exports() -> None:
    import hf_safety_merge

    assert callable(hf_safety_merge.prepare_safekey_dataset) and "prepare_safekey_dataset" in hf_safety_merge.__all__


def test_study_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--config", "--preset", "--work", "--results", "--device", "--threads", "--report-only", "resumes"):
        assert word in out, word
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "    study" in capsys.readouterr().out


def test_study_bad_preset_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["study", "--preset", "dmeo", "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown study preset 'dmeo'; expected 'demo' or 'full' (did you mean 'demo'?)"]
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit) as e:  # a config file or a preset, not both
        main(["study", "--preset", "demo", "--config", "x.yaml"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_study_report_only_needs_a_finished_study(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--report-only` on an empty work folder: one line, exit 2, nothing written (no report,
    no --results copy)."""
    work = tmp_path / "work"
    work.mkdir()
    rc = main(["study", "--preset", "demo", "--work", str(work), "--results", str(tmp_path / "res"), "--report-only"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: report_only: ") and "no finished study stages" in err[0]
    assert list(work.iterdir()) == [] and not (tmp_path / "res").exists()


def test_study_config_and_results_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The options reach `StudyConfig` as `benchmarks/safety_transfer.py` passes them (a config
    file's keys, then --device/--threads), and --results receives the table, results and figures."""
    import hf_safety_merge.study as study_pkg

    seen: dict[str, Any] = {}

    def fake_run_study(cfg: object, work: str, report_only: bool = False) -> dict[str, object]:
        seen.update(cfg=cfg, work=work, report_only=report_only)
        w = Path(work)
        (w / "report").mkdir(parents=True)
        for f in ("study.md", "study.json", "report/pareto_unsafe.png"):
            (w / f).write_text(f)
        return {"rows": []}

    monkeypatch.setattr(study_pkg, "run_study", fake_run_study)
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text("preset: demo\nmax_new_tokens: 12\n")
    assert main(["study", "--config", str(cfg_file), "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"),
                 "--threads", "3"]) == 0
    cfg = seen["cfg"]
    assert cfg.max_new_tokens == 12 and cfg.threads == 3 and seen["report_only"] is False
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["pareto_unsafe.png", "study.json", "study.md"]
    assert "copied the table, results and plots" in capsys.readouterr().out
