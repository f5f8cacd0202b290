"""AsFT penalty: the cheap form equals the naive `||(I - C) B A||_F^2`, and so do its gradients;
anchors (Safe LoRA matrix, top-k projector) and their safetensors cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_safety_merge.errors import CheckpointError, ConfigError
from hf_safety_merge.training.asft.anchors import AlignmentAnchors
from hf_safety_merge.training.asft.projector import (
    basin_components,
    build_anchor,
    naive_offbasin_penalty,
    offbasin_penalty,
)


def _case(out_f: int, in_f: int, r: int, v_rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(out_f, v_rank, generator=g, dtype=torch.float64) @ torch.randn(v_rank, in_f, generator=g, dtype=torch.float64)
    b = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    return v, b, a


def _safe_lora_c(v: torch.Tensor) -> torch.Tensor:
    return v @ v.T / torch.linalg.matrix_norm(v)


def _topk_c(v: torch.Tensor, k: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(v, full_matrices=False)
    uk = u[:, :k]
    return uk @ uk.T


def _check_value_and_grads(v: torch.Tensor, b: torch.Tensor, a: torch.Tensor, projector: str, k: int | None, scaling: float) -> None:
    anchor = build_anchor(v, projector, k, dtype=torch.float64)  # type: ignore[arg-type]
    c_ref = _safe_lora_c(v) if projector == "safe_lora" else _topk_c(v, min(k or 1, int(torch.linalg.matrix_rank(v))))
    torch.testing.assert_close(anchor.dense(), c_ref, rtol=1e-9, atol=1e-9)

    b1, a1 = b.clone().requires_grad_(), a.clone().requires_grad_()
    cheap = offbasin_penalty(b1, a1, anchor, scaling)
    cheap.backward()
    b2, a2 = b.clone().requires_grad_(), a.clone().requires_grad_()
    naive = naive_offbasin_penalty(b2, a2, c_ref, scaling)
    naive.backward()
    torch.testing.assert_close(cheap, naive, rtol=1e-9, atol=1e-9)
    assert b1.grad is not None and b2.grad is not None and a1.grad is not None and a2.grad is not None
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-8, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 40),
    in_f=st.integers(1, 40),
    r=st.integers(1, 9),
    v_rank=st.integers(1, 12),
    projector=st.sampled_from(["safe_lora", "topk"]),
    k=st.integers(1, 10),
    scaling=st.sampled_from([1.0, 4.0, 0.25]),
    seed=st.integers(0, 2**16),
)
def test_cheap_penalty_equals_naive_property(out_f: int, in_f: int, r: int, v_rank: int, projector: str, k: int, scaling: float, seed: int) -> None:
    v, b, a = _case(out_f, in_f, r, v_rank, seed)
    _check_value_and_grads(v, b, a, projector, k, scaling)


@pytest.mark.parametrize(
    ("out_f", "in_f", "r"),
    [(64, 64, 8), (32, 128, 4), (128, 32, 8), (48, 48, 1), (16, 96, 16)],  # square, down-proj, up-proj (factor form), GQA k/v
)
@pytest.mark.parametrize("projector", ["safe_lora", "topk"])
def test_cheap_penalty_equals_naive_shapes(out_f: int, in_f: int, r: int, projector: str) -> None:
    v, b, a = _case(out_f, in_f, r, min(out_f, in_f), seed=out_f * 1000 + in_f)
    _check_value_and_grads(v, b, a, projector, 6, 1.0)


def test_anchor_kind_follows_cost() -> None:
    # up projection (out >> in): Safe LoRA factor F = V / sqrt(||V||), never out x out
    v = torch.randn(128, 32, dtype=torch.float64)
    assert build_anchor(v).kind == "factor"
    assert build_anchor(v).matrix.shape == (128, 32)
    assert build_anchor(v.T.contiguous()).kind == "dense"
    assert build_anchor(torch.randn(64, 64), "topk", 4).kind == "factor"
    assert build_anchor(torch.randn(8, 64), "topk", 6).kind == "dense"


def test_topk_is_a_projector_and_safe_lora_is_not() -> None:
    v = torch.randn(24, 40, dtype=torch.float64)
    c = build_anchor(v, "topk", 5, dtype=torch.float64).dense()
    torch.testing.assert_close(c @ c, c)
    s = build_anchor(v, "safe_lora", dtype=torch.float64).dense()
    assert not torch.allclose(s @ s, s)


def test_zero_direction_penalises_everything() -> None:
    b, a = torch.randn(10, 3, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    anchor = build_anchor(torch.zeros(10, 7), dtype=torch.float64)
    torch.testing.assert_close(offbasin_penalty(b, a, anchor), ((b @ a) ** 2).sum())


def test_basin_components_match_dense() -> None:
    v, b, a = _case(30, 20, 4, 6, 3)
    anchor = build_anchor(v, dtype=torch.float64)
    c = anchor.dense()
    d = 2.0 * b @ a
    comp = basin_components(b, a, anchor, 2.0)
    assert comp["total"] == pytest.approx(float(torch.linalg.matrix_norm(d)), rel=1e-9)
    assert comp["in_basin"] == pytest.approx(float(torch.linalg.matrix_norm(c @ d)), rel=1e-9)
    assert comp["off_basin"] == pytest.approx(float(torch.linalg.matrix_norm(d - c @ d)), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity((c @ d).reshape(1, -1), d.reshape(1, -1)).item()
    assert comp["cosine"] == pytest.approx(cos, rel=1e-9)


def test_bad_projector_and_rank() -> None:
    with pytest.raises(ConfigError, match="projector 'nope'"):
        build_anchor(torch.randn(4, 4), "nope")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="k >= 1"):
        build_anchor(torch.randn(4, 4), "topk", 0)
    with pytest.raises(CheckpointError, match="NaN"):
        build_anchor(torch.full((4, 4), float("nan")), name="x")


# ------------------------------------------------------------------------------------------------
# anchors from checkpoints, and their cache
# ------------------------------------------------------------------------------------------------

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.up_proj"]


def test_anchors_from_checkpoints_and_cache(llama_family: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    anchors = AlignmentAnchors.from_checkpoints(llama_family["aligned"], llama_family["base"], ["base_model.model." + MODULES[0], *MODULES[1:]])
    assert list(anchors) == MODULES
    wa = load_file(llama_family["aligned"] / "model.safetensors")
    wb = load_file(llama_family["base"] / "model.safetensors")
    for m in MODULES:
        v = (wa[m + ".weight"].double() - wb[m + ".weight"].double())
        torch.testing.assert_close(anchors[m].dense().double(), _safe_lora_c(v), rtol=1e-5, atol=1e-6)
    assert anchors[MODULES[2]].kind == "factor"  # up_proj: 256 x 128

    path = anchors.save(tmp_path / "cache" / "anchors.safetensors")
    again = AlignmentAnchors.load(path, projector="safe_lora")
    assert list(again) == MODULES
    for m in MODULES:
        assert again[m].kind == anchors[m].kind
        torch.testing.assert_close(again[m].matrix, anchors[m].matrix)
        assert again[m].v_norm == pytest.approx(anchors[m].v_norm)
    with pytest.raises(ConfigError, match="projector 'safe_lora'"):
        AlignmentAnchors.load(path, projector="topk", k=4)
    # a folder holding the default file name
    anchors.save(tmp_path / "folder")
    assert list(AlignmentAnchors.load(tmp_path / "folder")) == MODULES


def test_anchors_errors_name_the_culprit(llama_family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.qq_proj"):
        AlignmentAnchors.from_checkpoints(llama_family["aligned"], llama_family["base"], ["model.layers.0.self_attn.qq_proj"])
    with pytest.raises(CheckpointError, match="no such file"):
        AlignmentAnchors.from_checkpoints(tmp_path / "missing", llama_family["base"], MODULES)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(CheckpointError, match="not an AsFT anchors file"):
        AlignmentAnchors.load(bad)
