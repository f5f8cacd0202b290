"""`repair`: method x scale searched constraint-first on the toy chat models, the choice merged with
its card; nothing written when no setting keeps the constraints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_safety_merge import SafetyMergeConfig, merge
from hf_safety_merge.calibrate import RepairConfig, repair
from hf_safety_merge.cli import main as cli_main
from hf_safety_merge.errors import CalibrationError, ConfigError


def _csv(path: Path, prompts: list[str]) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt"])
        w.writerows([[p] for p in prompts])
    return str(path)


@pytest.fixture(scope="module")
def toy(toy_space_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from hf_safety_merge.demo import toy_models as tm

    d = tmp_path_factory.mktemp("repair-prompts")
    toys = toy_space_dir / f"toy-v{tm.VERSION}"
    return {"task": str(toys / "task"), "aligned": str(toys / "aligned"), "vector": str(toys / "safety_vector"),
            "harmful": _csv(d / "h.csv", tm.HARMFUL_PROMPTS + tm.UNSEEN_HARMFUL_PROMPTS),
            "benign": _csv(d / "b.csv", [p for p, _ in tm.BENIGN])}


def _cal(toy: dict[str, str], **kw: object) -> dict[str, object]:
    return {"harmful": toy["harmful"], "benign": toy["benign"], "holdout_split": False, "max_unsafe": 0.3,
            "max_over_refusal_increase": 0.5, "max_probes": 3, "max_new_tokens": 16, **kw}


def test_cli_repair_searches_every_method_and_writes_the_choice(toy: dict[str, str], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "repaired"
    y = tmp_path / "repair.yaml"
    y.write_text(json.dumps({
        "task_model": toy["task"], "task_reference": toy["aligned"], "safety_vectors": [toy["vector"]],
        "alignment_vector": toy["vector"], "methods": ["enchtable", "resta", "safe_lora", "ties"],
        "parameters": {"enchtable": {"lam": 5.0}}, "calibration": _cal(toy)}))
    assert cli_main(["repair", str(y), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "repair: searching 4 method(s)" in printed and "ship " in printed
    rep = json.loads((out / "repair.json").read_text())
    assert [s["method"] for s in rep["searches"]] == ["enchtable", "task_arithmetic", "safe_lora", "ties"]
    assert all(len(s["probes"]) <= 3 for s in rep["searches"])
    chosen = rep["chosen"]
    assert chosen is not None
    pick = next(s for s in rep["searches"] if s["method"] == chosen["method"])
    assert pick["feasible"]
    # the choice: the least unsafe of the settings that keep the constraints
    best = min(s["probes"][[p["scale"] for p in s["probes"]].index(s["chosen"])]["unsafe"]["value"]
               for s in rep["searches"] if s["feasible"])
    assert pick["probes"][[p["scale"] for p in pick["probes"]].index(pick["chosen"])]["unsafe"]["value"] == best
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == chosen["method"]
    assert report["parameters"][chosen["parameter"]] == pytest.approx(chosen["value"])
    card = (out / "README.md").read_text()
    assert "## Repair" in card and "**ship " in card and card.count("<details>") == 4
    assert (out / "repair.png").is_file()

    # the written model is the engine's own merge at the chosen setting, bit for bit
    ref = tmp_path / "ref"
    merge(SafetyMergeConfig(task_model=toy["task"], task_reference=toy["aligned"], safety_vector=toy["vector"],
                            method=chosen["method"], parameters={**({"lam": 5.0} if chosen["method"] == "enchtable" else {}),
                                                                 chosen["parameter"]: chosen["value"]},
                            output_dir=str(ref)), progress=False)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_repair_reads_the_task_model_once(toy: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_safety_merge.io import checkpoints

    reads: dict[str, int] = {}
    orig = checkpoints.SafetensorsCheckpoint.get

    def counting(self: checkpoints.SafetensorsCheckpoint, name: str) -> torch.Tensor:
        if str(self.path) == toy["task"]:
            reads[name] = reads.get(name, 0) + 1
        return orig(self, name)

    monkeypatch.setattr(checkpoints.SafetensorsCheckpoint, "get", counting)
    res = repair(RepairConfig(task_model=toy["task"], task_reference=toy["aligned"], safety_vectors=[toy["vector"]],
                              alignment_vector=toy["vector"], methods=["enchtable", "resta", "safe_lora", "dare"],
                              calibration=_cal(toy, max_probes=2)), progress=False, write=False)
    assert len(res.searches) == 4 and sum(len(s.search.probes) for s in res.searches) <= 8
    covered = [n for n in reads if n.endswith("proj.weight")]
    assert covered and max(reads[n] for n in covered) == 1  # four methods, 1 read of each merged tensor


def test_repair_writes_nothing_when_no_setting_keeps_the_constraints(toy: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "never"
    # no over-refusal rise allowed at all, at 99.9% one-sided: every scale's bound is above 0
    cfg = RepairConfig(task_model=toy["task"], task_reference=toy["aligned"], safety_vectors=[toy["vector"]],
                       methods=["resta"], calibration=_cal(toy, max_over_refusal_increase=0.0, confidence=0.999,
                                                           max_probes=2), output_dir=str(out))
    with pytest.raises(CalibrationError, match=r"no setting of any method keeps the constraints.*nothing written"):
        repair(cfg, progress=False)
    assert not out.exists()


def test_repair_warns_when_its_prompts_cannot_resolve_one_prompt(toy: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """A 5-point budget on the toy's few benign prompts: one extra refusal is already over it, so
    the repair says so (a warning, and in the result's notes) before it searches."""
    cfg = RepairConfig(task_model=toy["task"], task_reference=toy["aligned"], safety_vectors=[toy["vector"]],
                       methods=["resta"], calibration=_cal(toy, max_over_refusal_increase=0.05, max_probes=2))
    with caplog.at_level("WARNING", logger="hf_safety_merge.calibrate"):
        res = repair(cfg, progress=False, write=False, on_infeasible="return")
    note = next(n for n in res.notes if "cannot resolve one prompt" in n)
    assert "over-refusal rise" in note and "benign calibration prompts" in note and note in caplog.text
    assert res.to_dict()["notes"] == res.notes
    # a budget the prompts can resolve: no such note
    wide = RepairConfig(task_model=toy["task"], task_reference=toy["aligned"], safety_vectors=[toy["vector"]],
                        methods=["resta"], calibration=_cal(toy, max_probes=2))
    assert not any("cannot resolve" in n for n in repair(wide, progress=False, write=False).notes)


def test_repair_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"repair method 'enchtabel'.*did you mean 'enchtable'"):
        RepairConfig(task_model="x", task_reference="y", safety_vectors=["v"], methods=["enchtabel"])
    with pytest.raises(ConfigError, match="need `safety_vectors`"):
        RepairConfig(task_model="x", task_reference="y", methods=["resta"])
    with pytest.raises(ConfigError, match="give `task_reference`"):
        RepairConfig(task_model="x", safety_vectors=["v"])
    with pytest.raises(ConfigError, match=r"ranges\['resta'\] = \[3, 0.5\]: expected \[low, high\]"):
        RepairConfig(task_model="x", task_reference="y", safety_vectors=["v"], ranges={"resta": [3, 0.5]})
    with pytest.raises(ConfigError, match=r"held-out check.*holdout_split"):
        RepairConfig(task_model="x", task_reference="y", safety_vectors=["v"], check_harmful=10,
                     calibration={"holdout_split": False})
