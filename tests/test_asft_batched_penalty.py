"""AsFT: the batched penalty (one bmm per group of same-shape modules) equals the per-module
loop, in value and in gradients, for mixed groups (dense and factor anchors, several shapes,
LoRA scalings), and reuses its stacked anchors only while they are the same tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_safety_merge.training.asft.binding import AnchorBinding, LoraTarget
from hf_safety_merge.training.asft.penalty import _STACK_CACHE, anchored_penalty
from hf_safety_merge.training.asft.projector import build_anchor


def _bindings(dtype: torch.dtype) -> list[AnchorBinding]:
    g = torch.Generator().manual_seed(0)
    out: list[AnchorBinding] = []
    # (out, in, r, projector, k, scaling): 3 q-like, 3 v-like (factor), 2 with another scaling, one odd shape
    specs = [(24, 16, 4, "safe_lora", None, 2.0)] * 3 + [(8, 16, 4, "topk", 3, 2.0)] * 3 + \
        [(24, 16, 4, "safe_lora", None, 0.5)] * 2 + [(12, 20, 2, "safe_lora", None, 1.0)]
    for i, (o, n, r, proj, k, s) in enumerate(specs):
        v = torch.randn(o, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
        anchor = build_anchor(v, proj, k, dtype=dtype)  # type: ignore[arg-type]
        la, lb = nn.Linear(n, r, bias=False), nn.Linear(r, o, bias=False)
        with torch.no_grad():
            la.weight.copy_(torch.randn(r, n, generator=g))
            lb.weight.copy_(torch.randn(o, r, generator=g))
        layer = SimpleNamespace(lora_A={"default": la}, lora_B={"default": lb}, scaling={"default": s})
        out.append(AnchorBinding(LoraTarget(f"model.layers.{i}.proj", layer, "default"), anchor))
    return out


@pytest.mark.parametrize("include_scaling", [False, True])
def test_batched_penalty_equals_loop_float64(include_scaling: bool) -> None:
    bindings = _bindings(torch.float64)
    for b in bindings:
        b.target.layer.lora_A["default"].double()
        b.target.layer.lora_B["default"].double()
    assert {b.anchor.kind for b in bindings} == {"dense", "factor"}
    params = [p for b in bindings for p in (b.target.lora_a, b.target.lora_b)]
    loop = anchored_penalty(bindings, include_scaling, batched=False)
    assert loop is not None
    g_loop = torch.autograd.grad(loop, params)
    for _ in range(2):  # second call: stacked anchors from the cache
        batched = anchored_penalty(bindings, include_scaling, batched=True)
        assert batched is not None
        g_batched = torch.autograd.grad(batched, params)
        torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)
        for x, y in zip(g_batched, g_loop):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_batched_penalty_float32_as_accurate_as_loop() -> None:
    """In float32 both forms round differently; the batched one is no further from the float64 value."""
    b32, b64 = _bindings(torch.float32), _bindings(torch.float64)
    for b in b64:
        b.target.layer.lora_A["default"].double()
        b.target.layer.lora_B["default"].double()
    exact = anchored_penalty(b64, True, batched=False)
    g_exact = torch.autograd.grad(exact, [p for b in b64 for p in (b.target.lora_a, b.target.lora_b)])
    params = [p for b in b32 for p in (b.target.lora_a, b.target.lora_b)]
    errs = {}
    for batched in (False, True):
        p = anchored_penalty(b32, True, batched=batched)
        g = torch.autograd.grad(p, params)
        errs[batched] = (abs(float(p) - float(exact)) / float(exact),
                         max(float((x.double() - y).abs().max() / y.abs().max()) for x, y in zip(g, g_exact)))
    assert errs[True][0] <= 4 * errs[False][0] + 1e-6
    assert errs[True][1] <= 4 * errs[False][1] + 1e-6


def test_batched_penalty_sees_new_anchor_tensors() -> None:
    bindings = _bindings(torch.float64)
    first = anchored_penalty(bindings, batched=True)
    anchor = bindings[0].anchor
    bindings[0].anchor = type(anchor)(anchor.matrix * 0, anchor.kind, anchor.v_norm)  # a new tensor: C = 0
    second = anchored_penalty(bindings, batched=True)
    loop = anchored_penalty(bindings, batched=False)
    assert first is not None and second is not None and loop is not None
    torch.testing.assert_close(second, loop)
    assert float(second) != float(first)
    bindings[1].anchor.matrix.mul_(0.5)  # an in-place update is seen too
    third, loop = anchored_penalty(bindings, batched=True), anchored_penalty(bindings, batched=False)
    assert third is not None and loop is not None
    torch.testing.assert_close(third, loop)
    assert float(third) != float(second)
    assert len(_STACK_CACHE) <= 65
