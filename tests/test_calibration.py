"""Calibrated repair: the scale search, the exact in-memory probes, and the CLI end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.calibrate import CalibrationConfig, Probe, Target, search_scale
from hf_safety_merge.calibrate.probes import ScaledMerge
from hf_safety_merge.cli import main as cli_main
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.eval.metrics import rate


def _fake(unsafe, over=lambda s: 0.1, n: int = 48):  # type: ignore[no-untyped-def]
    calls: list[float] = []

    def probe(s: float) -> Probe:
        calls.append(s)
        return Probe(s, rate(k=round(n * min(1.0, max(0.0, unsafe(s)))), n=n), rate(k=round(n * min(1.0, over(s))), n=n))

    return probe, calls


def test_bisection_finds_the_smallest_scale_within_budget() -> None:
    probe, calls = _fake(lambda s: 1 - s)  # unsafe <= 0.05 from s ~ 0.95
    res = search_scale(probe, 0.01, 10.0, target=Target(0.05, 0.05), max_probes=8, baseline_over_refusal=0.1)
    assert res.met and res.strategy == "bisection" and len(calls) <= 8
    assert 0.94 <= res.chosen.scale <= 1.2
    assert all(p.unsafe.value > 0.05 for p in res.probes if p.scale < res.chosen.scale)


def test_target_out_of_range_reports_the_best_trade_off() -> None:
    probe, calls = _fake(lambda s: 0.5)
    res = search_scale(probe, 0.01, 10.0, target=Target(0.05, 0.05), max_probes=5, baseline_over_refusal=0.1)
    assert not res.met and len(calls) == 5 and "max_unsafe" in res.misses
    assert res.misses["max_unsafe"] == pytest.approx(0.45, abs=0.02)
    assert res.feasible and "the least unsafe that keeps them" in res.message("beta")
    assert "misses max_unsafe by 0.450" in res.message("beta")


def test_over_refusal_is_a_hard_constraint_never_given_away() -> None:
    # the unsafe target needs s ~ 0.95, where over-refusal has risen by ~0.29: the search returns
    # the least unsafe setting whose rise stays within 0.05 (s <= ~0.17), and says by how much
    # the unsafe target is missed; the old rule (least total shortfall) chose s ~ 0.95
    probe, _ = _fake(lambda s: 1 - s, over=lambda s: 0.1 + 0.3 * s)
    res = search_scale(probe, 0.01, 10.0, target=Target(0.05, 0.05), max_probes=8, baseline_over_refusal=0.1)
    assert not res.met and res.feasible and list(res.misses) == ["max_unsafe"]
    assert res.chosen.over_refusal.value - 0.1 <= 0.05 + 1e-9
    assert all(p.over_refusal.value - 0.1 > 0.05 for p in res.probes if p.unsafe.value < res.chosen.unsafe.value)
    loose = search_scale(probe, 0.01, 10.0, target=Target(0.05, 0.05, allow_constraint_violation=True),
                         max_probes=8, baseline_over_refusal=0.1)
    assert loose.chosen.scale == res.chosen.scale  # a feasible setting exists: the flag changes nothing


def test_no_feasible_setting_is_reported_not_chosen() -> None:
    probe, _ = _fake(lambda s: 1 - s, over=lambda s: 0.5)  # every scale breaks the over-refusal budget
    res = search_scale(probe, 0.01, 10.0, target=Target(0.05, 0.05), max_probes=4, baseline_over_refusal=0.1)
    assert not res.feasible and not res.met and "max_over_refusal_increase" in res.misses
    assert "keeps the constraints" in res.message("beta") and "least violating" in res.message("beta")


def _outcomes(flags: list[bool]) -> dict[str, bool]:
    return {f"p{i}": f for i, f in enumerate(flags)}


def test_paired_check_uses_the_same_prompts() -> None:
    from hf_safety_merge.calibrate.search import paired_rise_upper

    before = [i < 5 for i in range(48)]
    same = paired_rise_upper(_outcomes(before), _outcomes(before), 0.9)
    assert same[0] == 0 and 0 < same[1] < 0.05  # no change: within a 5-point budget
    one_more = list(before)
    one_more[20] = True
    rise, upper, n = paired_rise_upper(_outcomes(one_more), _outcomes(before), 0.9)
    assert n == 48 and rise == pytest.approx(1 / 48) and upper > 0.05  # one new refusal in 48: not shown within budget
    # swapped refusals (one new, one gone) are no rise, and the bound stays near the budget
    swapped = list(one_more)
    swapped[0] = False
    assert paired_rise_upper(_outcomes(swapped), _outcomes(before), 0.9)[0] == 0
    # the bound shrinks with more prompts: one new refusal in 125 is within 5 points
    b125 = [i < 13 for i in range(125)]
    a125 = list(b125)
    a125[50] = True
    assert paired_rise_upper(_outcomes(a125), _outcomes(b125), 0.9)[1] < 0.05


def test_resolution_notes_say_when_the_prompts_cannot_resolve_one_prompt() -> None:
    """`keepable_rise` agrees with the paired bound in its most favourable case (a baseline that
    flags nothing), and `resolution_notes` warns exactly when one prompt already breaks a budget."""
    from hf_safety_merge.calibrate.search import keepable_rise, paired_rise_upper, resolution_notes

    for n, budget, conf in [(48, 0.05, 0.9), (48, 0.05, 0.8), (125, 0.05, 0.9), (48, 0.1, 0.9)]:
        k, m = keepable_rise(n, budget, conf)
        before = [False] * n
        if k:
            assert paired_rise_upper(_outcomes([i < k for i in range(n)]), _outcomes(before), conf)[1] <= budget
        assert paired_rise_upper(_outcomes([i < k + 1 for i in range(n)]), _outcomes(before), conf)[1] > budget
        assert paired_rise_upper(_outcomes([i < 1 for i in range(m)]), _outcomes([False] * m), conf)[1] <= budget
        assert paired_rise_upper(_outcomes([i < 1 for i in range(m - 1)]), _outcomes([False] * (m - 1)), conf)[1] > budget
    assert keepable_rise(48, 0.05, 0.9) == (0, 66) and keepable_rise(48, 0.05, 0.8)[0] == 1
    notes = resolution_notes(Target(0.05, 0.05, max_utility_drop=0.1), 48, 48)
    assert len(notes) == 1 and "over-refusal" in notes[0] and "48 benign" in notes[0] and "at least 66" in notes[0]
    assert resolution_notes(Target(0.05, 0.05, max_utility_drop=0.1, confidence=0.8), 48, 48) == []
    utility = resolution_notes(Target(0.05, 0.05, max_utility_drop=0.02), 200, 48)
    assert len(utility) == 1 and "utility drop" in utility[0]


def test_paired_upper_bound_covers_at_its_confidence() -> None:
    # one-sided 90% bound of a paired rise: over 600 simulated calibration sets with a true rise of
    # 0.06 (p(new refusal) 0.08, p(refusal gone) 0.02, n 48), the bound is below 0.06 at most ~10%
    import random

    from hf_safety_merge.calibrate.search import paired_rise_upper

    rng = random.Random(0)
    below = 0
    for _ in range(600):
        before, after = {}, {}
        for i in range(48):
            u = rng.random()
            before[str(i)], after[str(i)] = (False, True) if u < 0.08 else (True, False) if u < 0.10 else \
                ((True, True) if u < 0.2 else (False, False))
        below += paired_rise_upper(after, before, 0.9)[1] < 0.06
    assert below / 600 <= 0.13


def test_paired_outcomes_decide_the_constraint() -> None:
    from hf_safety_merge.eval.metrics import rate as mk

    base_ref = [i < 5 for i in range(48)]
    baseline = Probe(0.0, mk(k=40, n=48), mk(base_ref), outcomes={"refusal": _outcomes(base_ref)})

    def probe(s: float) -> Probe:
        # s >= 1 adds one new refusal; the rates alone (+2.1 points) would pass a 5-point budget
        ref = list(base_ref)
        if s >= 1:
            ref[30] = True
        return Probe(s, mk(k=round(48 * max(0.0, 1 - s / 2)), n=48), mk(ref), outcomes={"refusal": _outcomes(ref)})

    res = search_scale(probe, 0.1, 4.0, target=Target(0.05, 0.05), max_probes=8, baseline=baseline)
    assert res.feasible and res.chosen.scale < 1 and not res.met
    point = search_scale(probe, 0.1, 4.0, target=Target(0.05, 0.05, confidence=0.5), max_probes=8, baseline=baseline)
    assert point.chosen.scale >= 1  # at 0.5 the bound is the point estimate (+2.1 points): kept


def test_non_monotone_curve_falls_back_to_a_grid() -> None:
    probe, calls = _fake(lambda s: 0.0 if s > 9 or 0.3 < s < 0.5 else 0.9)
    res = search_scale(probe, 0.01, 10.0, target=Target(0.05, 0.05), max_probes=8, baseline_over_refusal=0.1)
    assert res.strategy.startswith("grid") or res.chosen.scale < 9
    assert len(calls) <= 8


def test_integer_scale() -> None:
    probe, calls = _fake(lambda s: 1 - s / 30)
    res = search_scale(probe, 0, 60, target=Target(0.05, 0.5), max_probes=8, integer=True, baseline_over_refusal=0.1)
    assert res.met and all(float(c).is_integer() for c in calls) and 28 <= res.chosen.scale <= 30


def test_calibration_config_is_typed() -> None:
    with pytest.raises(ConfigError, match=r"calibration option 'max_unsafe' = 2: must be less than or equal to 1"):
        CalibrationConfig(max_unsafe=2)
    with pytest.raises(ConfigError, match=r"unknown calibration option 'max_unsfe'.*did you mean 'max_unsafe'"):
        CalibrationConfig.from_dict({"max_unsfe": 0.1})
    with pytest.raises(ConfigError, match="min_utility"):
        CalibrationConfig(min_utility=0.5)
    with pytest.raises(ConfigError, match=r"method 'enchtable' is calibrated by 'beta'"):
        CalibrationConfig(parameter="density").scale_for("enchtable")


@pytest.fixture(scope="module")
def vec(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calvec") / "vec"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False)
    return out


@pytest.mark.parametrize(("method", "parameter", "scale", "extra"), [
    ("enchtable", "beta", 0.3, {"lam": 20.0}),
    ("enchtable", "beta", 2.0, {}),
    ("task_arithmetic", "beta", 0.7, {}),
    ("safe_lora", "num_proj_layers", 5, {}),
    ("ties", "density", 0.7, {}),
    ("dare", "density", 0.6, {}),
])
def test_probe_equals_the_streaming_merge(llama_family: dict[str, Path], vec: Path, tmp_path: Path,
                                          method: str, parameter: str, scale: float, extra: dict) -> None:
    """A probe's in-memory tensors at a scale are the streaming merge's at that scale (for
    EnchTable through the closed form w(alpha) = exp(-lam (alpha a + b) / (2r)^2))."""
    cfg = SafetyMergeConfig(task_model=str(llama_family["task"]), task_reference=str(llama_family["aligned"]),
                            safety_vector=str(vec), method=method, parameters=extra, output_dir=str(tmp_path / "x"))
    sm = ScaledMerge(cfg, parameter, progress=False)
    try:
        got, summary = sm.merged(scale)
    finally:
        sm.close()
    res = merge(SafetyMergeConfig(**{**cfg.to_dict(), "parameters": {**extra, parameter: scale}, "output_dir": str(tmp_path / "o")}),
                progress=False)
    ref = load_file(tmp_path / "o" / "model.safetensors")
    for n, t in got.items():
        torch.testing.assert_close(t, ref[n], rtol=1e-6, atol=1e-7, msg=n)
    if method == "enchtable":
        assert summary["alpha"] == pytest.approx(res.summary["alpha"], rel=1e-9)
        assert summary["w_min"] == pytest.approx(res.summary["w_min"], rel=1e-6, abs=1e-12)
        assert 0 < res.summary["w_min"] < 1


def _csv(path: Path, rows: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt"])
        for r in rows:
            w.writerow([r])
    return path


def test_cli_calibrate_end_to_end_on_the_toy_models(toy_space_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_safety_merge.demo import toy_models as tm

    toys = toy_space_dir / f"toy-v{tm.VERSION}"
    harmful = _csv(tmp_path / "h.csv", tm.HARMFUL_PROMPTS + tm.UNSEEN_HARMFUL_PROMPTS)
    benign = _csv(tmp_path / "b.csv", [p for p, _ in tm.BENIGN])
    out = tmp_path / "patched"
    y = tmp_path / "m.yaml"
    y.write_text(
        f"task_model: {toys / 'task'}\ntask_reference: {toys / 'aligned'}\nsafety_vector: {toys / 'safety_vector'}\n"
        f"method: enchtable\nparameters: {{lam: 5.0}}\noutput_dir: {out}\n"
        f"calibration: {{harmful: {harmful}, benign: {benign}, max_unsafe: 0.3, max_over_refusal_increase: 1.0, "
        f"max_probes: 5, max_new_tokens: 24}}\n"
    )
    assert cli_main(["merge", str(y), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "calibrating enchtable's beta" in printed and printed.count("\n") > 6
    report = json.loads((out / "merge_report.json").read_text())
    cal = report["calibration"]
    assert cal["met"] and cal["parameter"] == "beta" and len(cal["probes"]) <= 5
    chosen = cal["chosen"]
    assert report["parameters"]["beta"] == pytest.approx(chosen)
    assert all(p["unsafe"]["value"] > 0.3 for p in cal["probes"] if p["scale"] < chosen)
    card = (out / "README.md").read_text()
    assert "## Calibration" in card and "Caveat" in card and "| beta | unsafe |" in card
    assert (out / "calibration.png").is_file()


@pytest.mark.parametrize("method", ["enchtable", "task_arithmetic"])
def test_probe_equals_the_streaming_merge_for_a_lora_task(llama_family: dict[str, Path], vec: Path, tmp_path: Path,
                                                         method: str) -> None:
    """Base + LoRA adapter as the task model: the probe's tensors and its loaded model (base with the
    LoRA update applied) match the streaming merge and peft's merge_and_unload."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(llama_family["aligned"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_ref = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    params = {"lam": 20.0} if method == "enchtable" else {}
    cfg = SafetyMergeConfig(task_model=str(llama_family["aligned"]), task_adapter=str(tmp_path / "adapter"),
                            safety_vector=str(vec), method=method, parameters=params, output_dir=str(tmp_path / "x"))
    sm = ScaledMerge(cfg, "beta", progress=False)
    try:
        got, _ = sm.merged(0.5)
        _, _, state = sm.load_model(tokenizer=False)
    finally:
        sm.close()
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        torch.testing.assert_close(state[n], merged_ref[n], rtol=1e-5, atol=1e-6)  # the task model = base + LoRA
    merge(SafetyMergeConfig(**{**cfg.to_dict(), "parameters": {**params, "beta": 0.5}, "output_dir": str(tmp_path / "o")}),
          progress=False)
    ref = load_file(tmp_path / "o" / "model.safetensors")
    for n, t in got.items():
        torch.testing.assert_close(t, ref[n], rtol=1e-6, atol=1e-7, msg=n)
