"""The last fidelity details against the EnchTable reference (AntCPLab/EnchTable), docs/merging.md:

- how much of the patch survives the output dtype (measured per tensor, reported, warned);
- 1-D tensors in vectors (`min_ndim`): the effect on `||Delta_s||` and alpha;
- shape mismatches: refused by default, kept as the task's with `on_shape_mismatch: skip`;
- the literal interference formula: `backend: svd` + `mask_null_triplets: false` is the
  reference's form, the `gram` backend is not (on a rank-deficient tau);
- a fixed `alpha` instead of `beta` (the reference without `--ada`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from naive_reference import dense_interference, load_state

from hf_safety_merge import ConfigError, SafetyMergeConfig, SafetyVector, TensorFilter, merge
from hf_safety_merge.errors import PlanError
from hf_safety_merge.methods.interference import interference_score
from hf_safety_merge.testing.models import make_tiny_model, perturb, save

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fidelity")
    base = make_tiny_model("llama", 0, **TINY)
    aligned = perturb(make_tiny_model("llama", 0, **TINY), 0.05, 1)
    task = perturb(make_tiny_model("llama", 0, **TINY), 0.2, 2)
    bigger_vocab = perturb(make_tiny_model("llama", 0, **{**TINY, "vocab_size": 160}), 0.2, 2)
    paths = {"base": save(base, root / "base"), "aligned": save(aligned, root / "aligned"), "task": save(task, root / "task"),
             "task_bf16": save(task.to(torch.bfloat16), root / "task_bf16"), "task_vocab": save(bigger_vocab, root / "task_vocab")}
    # a tiny patch: Delta_s of RMS ~1e-4 x the weights (aligned2 - base)
    tiny = perturb(make_tiny_model("llama", 0, **TINY), 1e-4, 3)
    paths["tiny_aligned"] = save(tiny, root / "tiny_aligned")
    SafetyVector.compute(paths["aligned"], paths["base"], root / "vec", progress=False)
    SafetyVector.compute(paths["tiny_aligned"], paths["base"], root / "vec_tiny", progress=False)
    SafetyVector.compute(paths["aligned"], paths["base"], root / "vec_1d", tensor_filter=TensorFilter(min_ndim=1), progress=False)
    paths.update(vec=root / "vec", vec_tiny=root / "vec_tiny", vec_1d=root / "vec_1d")
    return paths


def _merge(models: dict[str, Path], out: Path, **kw: Any) -> Any:
    cfg = dict(task_model=str(models["task"]), safety_vector=str(models["vec"]), output_dir=str(out), method="task_arithmetic",
               parameters={"beta": 1.0})
    cfg.update(kw)
    return merge(SafetyMergeConfig(**cfg), progress=False)


# ---------------------------------------------------------------------------------------------
# 2. the output dtype
# ---------------------------------------------------------------------------------------------


def test_patch_survival_in_bf16_is_measured_reported_and_warned(models: dict[str, Path], tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hf_safety_merge"):
        res = _merge(models, tmp_path / "bf16", task_model=str(models["task_bf16"]), safety_vector=str(models["vec_tiny"]))
    report = json.loads((tmp_path / "bf16" / "merge_report.json").read_text())
    surv = report["patch_survival"]
    assert surv is not None and surv["tensors"] == len(res.tensors) > 0
    # a patch of ~1e-4 of the weights is mostly rounded away in bf16 (relative step 2^-8)
    assert surv["median"] < 0.5 and surv["below_half"] > 0 and surv["below_half_tensors"]
    assert any("keep under half of their patch" in r.getMessage() for r in caplog.records)
    assert "patch_survival" in res.summary and "dtype: float32" in res.summary["patch_survival"]
    assert "patch_survival" in (tmp_path / "bf16" / "README.md").read_text()
    # the number is what the files say: <round(merged) - task, p> / <p, p> on the whole tensor
    name = "model.layers.0.mlp.up_proj.weight"
    task = load_state(models["task_bf16"])[name].double()
    delta = SafetyVector.from_pretrained(models["vec_tiny"])[name].double()
    out = load_state(tmp_path / "bf16")[name].double()
    p = (task.float() + delta.float()).double() - task  # the float32 merge's patch
    exact = float(((out - task) * p).sum() / (p * p).sum())
    assert report["tensors"][name]["patch_survival"] == pytest.approx(exact, abs=0.03)
    # float32 output keeps every patch: nothing measured, nothing warned
    res32 = _merge(models, tmp_path / "f32", task_model=str(models["task_bf16"]), safety_vector=str(models["vec_tiny"]), dtype="float32")
    assert json.loads((tmp_path / "f32" / "merge_report.json").read_text())["patch_survival"] is None
    assert "patch_survival" not in res32.summary
    # a patch of normal size survives bf16 almost whole
    _merge(models, tmp_path / "big", task_model=str(models["task_bf16"]))
    big = json.loads((tmp_path / "big" / "merge_report.json").read_text())["patch_survival"]
    assert big["median"] > 0.95 and big["below_half"] == 0


# ---------------------------------------------------------------------------------------------
# 3. 1-D tensors (norms, biases) in the vector
# ---------------------------------------------------------------------------------------------


def test_min_ndim_one_adds_the_norms_to_delta_s_and_moves_alpha(models: dict[str, Path], tmp_path: Path) -> None:
    v2, v1 = SafetyVector.from_pretrained(models["vec"]), SafetyVector.from_pretrained(models["vec_1d"])
    one_d = [n for n in v1 if len(v1.meta(n).shape) == 1]
    assert one_d and not any(len(v2.meta(n).shape) == 1 for n in v2)
    n2, n1 = v2.config.norm, v1.config.norm
    extra = sum(float(v1[n].double().pow(2).sum()) for n in one_d)
    assert n1**2 == pytest.approx(n2**2 + extra, rel=1e-6) and n1 > n2
    # EnchTable's alpha = beta ||tau|| / ||Delta_s||: the same tau, so alpha scales by n2 / n1
    kw = dict(method="enchtable", task_reference=str(models["base"]), parameters={"fine": False})
    a2 = _merge(models, tmp_path / "m2", **kw).summary["alpha"]
    a1 = _merge(models, tmp_path / "m1", safety_vector=str(models["vec_1d"]), **kw).summary["alpha"]
    assert a1 == pytest.approx(a2 * n2 / n1, rel=1e-6) and a1 < a2


# ---------------------------------------------------------------------------------------------
# 4. shape mismatches
# ---------------------------------------------------------------------------------------------


def test_shape_mismatch_refused_by_default_and_skipped_on_request(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"vocabulary sizes differ.*on_shape_mismatch: skip"):
        _merge(models, tmp_path / "no", task_model=str(models["task_vocab"]))
    assert not (tmp_path / "no").exists()
    for method, extra in (("task_arithmetic", {}), ("enchtable", {"task_reference": str(models["base"])})):
        out = tmp_path / method
        res = _merge(models, out, task_model=str(models["task_vocab"]), on_shape_mismatch="skip", method=method,
                     parameters={} if method == "enchtable" else {"beta": 1.0}, **extra)
        report = json.loads((out / "merge_report.json").read_text())
        skipped = report["shape_mismatch_skipped"]
        assert set(skipped) == {"model.embed_tokens.weight", "lm_head.weight"}, skipped
        task, merged = load_state(models["task_vocab"]), load_state(out)
        for n in skipped:  # kept as the task model has them
            assert torch.equal(merged[n], task[n])
        assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], task["model.layers.0.mlp.up_proj.weight"])
        assert res.num_merged == len(SafetyVector.from_pretrained(models["vec"]).keys()) - 2
        assert "on_shape_mismatch: skip" in res.summary["shape_mismatch_skipped"]
        assert "model.embed_tokens.weight" in (out / "README.md").read_text()
    with pytest.raises(ConfigError, match="on_shape_mismatch"):
        SafetyMergeConfig(task_model="a", safety_vector="b", on_shape_mismatch="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 5. the literal formula
# ---------------------------------------------------------------------------------------------


def test_svd_without_masking_is_the_reference_formula_on_rank_deficient_tau() -> None:
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(48, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 32, generator=g, dtype=torch.float64)  # rank 2 < r = 16
    delta = torch.randn(48, 32, generator=g, dtype=torch.float64) * 0.05
    lam = 1.0  # the reference's 200 drives w to ~1e-26 on this matrix; the forms differ the same way
    literal = math.exp(-dense_interference(tau, delta, 0.5, lam, mask_null=False))
    masked = math.exp(-dense_interference(tau, delta, 0.5, lam, mask_null=True))
    assert abs(literal - masked) > 1e-3  # the null triplets matter here
    w_svd, _ = interference_score(tau, delta, 0.5, lam, torch.float64, False, backend="svd")
    assert w_svd == pytest.approx(literal, rel=1e-12)
    # the gram backend builds P through S1^-1: with mask_null_triplets false it is neither the
    # literal form nor the masked one (docs/merging.md); with it true, it is the masked form
    w_gram, _ = interference_score(tau, delta, 0.5, lam, torch.float64, False, backend="gram")
    assert abs(w_gram - literal) / literal > 1e-3
    w_gram_masked, _ = interference_score(tau, delta, 0.5, lam, torch.float64, True, backend="gram")
    assert w_gram_masked == pytest.approx(masked, rel=1e-8)


# ---------------------------------------------------------------------------------------------
# 6. a fixed alpha
# ---------------------------------------------------------------------------------------------


def test_fixed_alpha_instead_of_beta(models: dict[str, Path], tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(method="enchtable", task_reference=str(models["base"]))
    res = _merge(models, tmp_path / "a1", parameters={"alpha": 1.0, "fine": False}, **kw)
    assert res.summary["alpha"] == 1.0
    v = SafetyVector.from_pretrained(models["vec"])
    task, out = load_state(models["task"]), load_state(tmp_path / "a1")
    vec = {n: v[n] for n in v}
    for n in vec:  # theta = theta_task + 1 * Delta_s (coarse only)
        torch.testing.assert_close(out[n], task[n] + vec[n].to(task[n].dtype), rtol=0, atol=1e-6)
    report = json.loads((tmp_path / "a1" / "merge_report.json").read_text())
    assert report["parameters"]["alpha"] == 1.0 and report["parameters"]["beta"] is None
    # beta stays the default when alpha is not given
    assert _merge(models, tmp_path / "b", parameters={"fine": False}, **kw).summary["alpha"] != 1.0
    with pytest.raises(ConfigError, match=r"exactly one of 'beta'.*and 'alpha'"):
        SafetyMergeConfig(task_model="a", safety_vector="b", method="enchtable", parameters={"alpha": 1.0, "beta": 0.1})
    with pytest.raises(ConfigError, match="alpha"):
        SafetyMergeConfig(task_model="a", safety_vector="b", method="enchtable", parameters={"alpha": -1.0})
    with pytest.raises(ConfigError, match="calibration searches 'beta'"):
        SafetyMergeConfig(task_model="a", safety_vector="b", method="enchtable", parameters={"alpha": 1.0},
                          calibration={"max_unsafe": 0.2})
