"""The safety-transfer study (`hf_safety_merge.study`): config validation, disjoint data splits,
and the whole align -> break -> repair -> evaluate pipeline on a tiny chat model (real TRL
training, real merges, real generation and judging; the numbers mean nothing at this size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.study import StudyConfig, arithmetic, load_study_data


def test_presets_and_errors(tmp_path: Path) -> None:
    demo = StudyConfig.preset("demo")
    full = StudyConfig.preset("full")
    assert demo.eval_harmful < full.eval_harmful and set(demo.methods) <= set(full.methods)
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        StudyConfig.preset("dmeo")
    with pytest.raises(ConfigError, match=r"unknown study option .eval_harmfull.*eval_harmful"):
        StudyConfig.preset("demo", eval_harmfull=3)
    with pytest.raises(ConfigError, match="study method 'enchtable'"):
        StudyConfig.preset("demo", methods=["enchtable"])
    with pytest.raises(ConfigError, match="merge_on_lora: 'asft' is not a merge repair"):
        StudyConfig.preset("demo", merge_on_lora=["asft"])
    with pytest.raises(ConfigError, match="asft_settings entry '1:svd'"):
        StudyConfig.preset("demo", asft_settings=["1:svd"])
    with pytest.raises(ConfigError, match=r"safekey_settings entry '0\.2'"):
        StudyConfig.preset("demo", safekey_settings=["0.2"])
    with pytest.raises(ConfigError, match="harmful_fracs"):
        StudyConfig.preset("demo", harmful_fracs=[1.0])
    p = tmp_path / "s.yaml"
    p.write_text("preset: demo\neval_task: 7\n")
    assert StudyConfig.from_file(p).eval_task == 7
    p.write_text("- a\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        StudyConfig.from_file(p)


def test_data_splits_are_disjoint(shared_data: Path) -> None:
    cfg = StudyConfig.preset("full", data_dir=str(shared_data))
    d = load_study_data(cfg)
    harm = [d.align_harmful, d.break_harmful, d.distill_harmful, d.eval_harmful]
    for i, a in enumerate(harm):
        for b in harm[i + 1 :]:
            assert not set(a) & set(b)
    assert not set(d.align_benign) & set(d.eval_benign)
    assert not {r["prompt"] for r in d.task_train} & {r["prompt"] for r in d.task_eval}
    assert len(d.eval_harmful) == cfg.eval_harmful and len(d.align_harmful) == cfg.align_harmful
    assert len(d.break_harmful) == round(cfg.task_train * 0.1 / 0.9)
    assert load_study_data(cfg).eval_harmful == d.eval_harmful  # seeded


def test_arithmetic_answers_are_exact() -> None:
    for r in arithmetic(200, 0):
        expr = r["prompt"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == r["answer"] and r["response"].endswith(f"The answer is {r['answer']}.")


def test_study_end_to_end_on_a_tiny_model(shared_data: Path, tmp_path: Path) -> None:
    from hf_safety_merge.distill.testing import make_tiny_chat_model
    from hf_safety_merge.study import run_study

    model = make_tiny_chat_model(tmp_path / "tiny", "llama")
    cfg = StudyConfig.preset(
        "demo", model=str(model), data_dir=str(shared_data), align_harmful=8, align_benign=8, task_train=18,
        harmful_fracs=(0.0, 0.1), distill_harmful=8, distill_steps=2, eval_harmful=8, eval_benign=8, eval_task=8,
        max_new_tokens=8, max_length=96, task_epochs=1, align_epochs=1, threads=1,
        methods=("enchtable_ffn", "resta", "safe_lora", "asft", "safekey"), enchtable_betas=(0.1, 1.0),
        merge_on_full=("enchtable_ffn", "enchtable_calibrated", "resta", "safe_lora"), merge_on_lora=("enchtable_ffn", "safe_lora"),
        asft_settings=("1:safe_lora",), safekey_settings=("0.2:0.2", "0:0"), calibration_prompts=6, calibration_probes=3,
    )
    work = tmp_path / "work"
    payload = run_study(cfg, work)
    names = [r["model"] for r in payload["rows"]]
    assert names[:2] == ["base", "aligned"]
    assert "ft-full-10pct+enchtable-ffn-calibrated" in names  # beta chosen by calibration, evaluated held out
    cal = json.loads((work / "ft-full-10pct+enchtable-ffn-calibrated" / "merge_report.json").read_text())["calibration"]
    assert cal["prompts"]["harmful"]["n"] == 6 and cal["prompts"]["harmful"]["side"] == "held out from every report"
    assert len(cal["probes"]) <= 3
    for n in ("ft-full-0pct", "ft-full-10pct", "ft-lora-0pct", "ft-lora-10pct", "ft-full-10pct+enchtable-ffn",
              "ft-full-10pct+resta", "ft-full-10pct+safe_lora", "ft-lora-10pct+enchtable-ffn", "ft-full-10pct+enchtable-ffn-beta1", "ft-lora-10pct+safe_lora", "asft-lora-10pct",
              "safekey-full-10pct", "safekey-full-10pct-head0-qmm0"):
        assert n in names, n
    for r in payload["rows"]:
        assert r["unsafe_rate"]["n"] == 8 and r["over_refusal"]["n"] == 8 and r["utility"]["n"] == 8
        assert set(r["attack_success"]) == {"none", "dan"}
    repaired = [r for r in payload["rows"] if r.get("targets")]
    assert len(repaired) == 11 and "ft-lora-10pct+resta" not in names
    assert payload["notes"]["safekey"] == "ran"
    md = (work / "study.md").read_text()
    assert "| repaired model |" in md and "Wall time per stage" in md
    assert (work / "report" / "safety_vs_utility.png").stat().st_size > 1000
    card = (work / "ft-full-10pct+enchtable-ffn" / "README.md").read_text()  # the patched model's card
    assert "## Evaluation" in card and "before (`ft-full-10pct`)" in card and "model-index" in card
    assert all(payload["timings"][k] > 0 for k in ("align", "break: ft-full-10pct", "repair: AsFT 1:safe_lora"))
    # a second run resumes from the cache: no stage is re-run
    again = run_study(cfg, work)
    assert again["timings"] == payload["timings"]
    assert json.loads((work / "study.json").read_text())["rows"] == again["rows"]
