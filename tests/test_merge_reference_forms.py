"""Where the merge methods meet (or knowingly leave) their reference code (docs/merging.md):

- EnchTable's coarse norm with tied embeddings: the library counts the shared tensor once (it is
  stored once in the checkpoint); the reference (`calculate_state_dict_norm` over
  `model.state_dict()` in AntCPLab/EnchTable `merge/models/utils.py`) counts it under both names.
  The exact relation between the two alphas is checked.
- Safe LoRA on a LoRA task model equals IBM/SafeLoRA's own procedure (`model.py`): cosine of
  `C B A` and `B A` per LoRA module, lowest `num_proj_layers` (or `<= threshold`) get `B <- C B`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from naive_reference import load_state

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.io.filters import TensorFilter
from hf_safety_merge.testing.models import make_tiny_model, perturb, save


@torch.no_grad()
def _state_dict_norm(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The reference's ||a - b||: every state_dict entry, a tied tensor under both of its names."""
    sa, sb = a.state_dict(), b.state_dict()
    return float(torch.cat([(sa[k].double() - sb[k].double()).flatten() for k in sa]).norm())


def test_tied_embedding_counted_once_reference_counts_twice(tmp_path: Path) -> None:
    kw = {"tie_word_embeddings": True}
    aligned = make_tiny_model("llama", 0, **kw)
    # a distilled vector leaves the embeddings alone (e.g. variant attn); the task fine-tune does not
    harmful = perturb(make_tiny_model("llama", 0, **kw), 0.05, 1, only=".layers.")
    task = perturb(make_tiny_model("llama", 0, **kw), 0.2, 2)
    assert "lm_head.weight" in aligned.state_dict() and aligned.lm_head.weight is aligned.model.embed_tokens.weight
    paths = {n: save(m, tmp_path / n) for n, m in (("aligned", aligned), ("harmful", harmful), ("task", task))}
    # every tensor (norms too), as the reference's state_dict difference
    SafetyVector.compute(paths["aligned"], paths["harmful"], tmp_path / "vec", tensor_filter=TensorFilter(min_ndim=1),
                         progress=False)
    res = merge(SafetyMergeConfig(task_model=str(paths["task"]), task_reference=str(paths["aligned"]),
                                  safety_vector=str(tmp_path / "vec"), method="enchtable",
                                  output_dir=str(tmp_path / "out")), progress=False)

    emb = "model.embed_tokens.weight"
    tau_e = float((task.get_parameter(emb).detach().double() - aligned.get_parameter(emb).detach().double()).norm())
    d_e = float((aligned.get_parameter(emb).detach().double() - harmful.get_parameter(emb).detach().double()).norm())
    tau_ref, d_ref = _state_dict_norm(task, aligned), _state_dict_norm(aligned, harmful)
    # the library: every stored tensor once
    tau_once, d_once = math.sqrt(tau_ref**2 - tau_e**2), math.sqrt(d_ref**2 - d_e**2)
    assert res.summary["tau_norm"] == pytest.approx(tau_once, rel=1e-6)
    assert res.summary["safety_vector_norm"] == pytest.approx(d_once, rel=1e-6)
    assert res.summary["alpha"] == pytest.approx(0.1 * tau_once / d_once, rel=1e-6)
    # the reference's alpha (its `ada_alpha` 0.1) differs by the documented factor
    alpha_ref = 0.1 * tau_ref / d_ref
    factor = math.sqrt(1 + tau_e**2 / tau_once**2) / math.sqrt(1 + d_e**2 / d_once**2)
    assert alpha_ref == pytest.approx(res.summary["alpha"] * factor, rel=1e-6)
    assert d_e == 0 and 1.005 < factor <= math.sqrt(2)  # here: sqrt(1 + ||tau_E||^2 / ||tau||^2)


@pytest.mark.parametrize("select", ["number", "threshold"])
def test_safe_lora_on_lora_task_equals_ibm_procedure(llama_family: dict[str, Path], tmp_path: Path, select: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama_family["aligned"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], tmp_path / "vec", progress=False)
    v = load_state(tmp_path / "vec", "safety_vector")

    # IBM/SafeLoRA model.py, per LoRA module: P = V V^T / ||V||, cos(P B A, B A), B <- P B where selected
    mods = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            a, b = mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double()
            V = v[key].double()
            P = V @ V.T / torch.linalg.norm(V)
            cos = float(torch.nn.functional.cosine_similarity((P @ b @ a).reshape(1, -1), (b @ a).reshape(1, -1)))
            mods[key] = (a, b, P, cos, mod.scaling["default"])
    cosines = sorted(m[3] for m in mods.values())
    k = 3
    thr = cosines[:k][-1] if select == "number" else (cosines[3] + cosines[4]) / 2
    params = {"select": select, "num_proj_layers": k, "threshold": thr}
    res = merge(SafetyMergeConfig(task_model=str(llama_family["aligned"]), task_adapter=str(tmp_path / "adapter"),
                                  safety_vector=str(tmp_path / "vec"), method="safe_lora", parameters=params,
                                  output_dir=str(tmp_path / "out")), progress=False)
    got, base = load_state(tmp_path / "out"), load_state(llama_family["aligned"])
    projected = 0
    for key, (a, b, P, cos, s) in mods.items():
        if cos <= thr:
            b = P @ b
            projected += 1
        torch.testing.assert_close(got[key].double(), base[key].double() + s * (b @ a), rtol=1e-5, atol=1e-6, msg=key)
        assert bool(res.tensors[key]["projected"]) == (cos <= thr), key
    assert projected == (k if select == "number" else 4)
