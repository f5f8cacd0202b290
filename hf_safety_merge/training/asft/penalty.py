"""AsFT's regulariser over bound LoRA targets: `sum ||(I - C) s B A||_F^2`, batched across
modules of the same shape and projector (one bmm per group; exact, tested against the per-module
loop)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch

from .binding import AnchorBinding
from .projector import (
    Anchor,
    offbasin_penalty,
)


class _StackedAnchors:
    """Anchors of one group of same-shape modules stacked into one (L, out, k) tensor, kept
    while the bindings hold the same anchor tensors (they are fixed during training)."""

    def __init__(self, anchors: list[Anchor]) -> None:
        self.sources = [a.matrix for a in anchors]  # held: identity checks stay valid
        self.versions = [m._version for m in self.sources]  # in-place updates bump it
        self.stacked = torch.stack(self.sources)

    def valid_for(self, anchors: list[Anchor]) -> bool:
        return len(anchors) == len(self.sources) and all(
            a.matrix is m and m._version == v for a, m, v in zip(anchors, self.sources, self.versions))


_STACK_CACHE: dict[tuple[Any, ...], _StackedAnchors] = {}


def _group_key(bnd: AnchorBinding, anchor: Anchor, scaling: float) -> tuple[Any, ...]:
    b, a = bnd.target.lora_b, bnd.target.lora_a
    return (anchor.kind, tuple(anchor.matrix.shape), anchor.matrix.dtype, tuple(b.shape), tuple(a.shape), b.device, scaling)


def _batched_penalty(bindings: list[AnchorBinding], include_lora_scaling: bool) -> torch.Tensor | None:
    """The same sum with one batched product per group of same-shape modules (e.g. every q_proj):
    `M = B - C B` as `bmm`s over the stacked group, then `sum((M^T M) * (A A^T))` per module.
    Equal to the per-module loop in exact arithmetic (tested to float32 rounding), and a handful
    of kernel launches instead of ~6 per module on a GPU."""
    groups: dict[tuple[Any, ...], list[tuple[AnchorBinding, Anchor, float]]] = {}
    for bnd in bindings:
        anchor = bnd.anchor_on(bnd.target.lora_b.device)
        scaling = bnd.target.scaling if include_lora_scaling else 1.0
        groups.setdefault(_group_key(bnd, anchor, scaling), []).append((bnd, anchor, scaling))
    total: torch.Tensor | None = None
    for key, members in groups.items():
        anchors = [m[1] for m in members]
        cache_key = (key, tuple(id(m[0]) for m in members))
        stacked = _STACK_CACHE.get(cache_key)
        if stacked is None or not stacked.valid_for(anchors):
            if len(_STACK_CACHE) > 64:
                _STACK_CACHE.clear()
            stacked = _StackedAnchors(anchors)
            _STACK_CACHE[cache_key] = stacked
        c = stacked.stacked
        dtype = c.dtype
        with torch.autocast(device_type=c.device.type, enabled=False):
            b = torch.stack([m[0].target.lora_b.to(dtype) for m in members])  # (L, out, r)
            a = torch.stack([m[0].target.lora_a.to(dtype) for m in members])  # (L, r, in)
            cb = torch.bmm(c, b) if key[0] == "dense" else torch.bmm(c, torch.bmm(c.transpose(1, 2), b))
            mm = b - cb
            p = (torch.bmm(mm.transpose(1, 2), mm) * torch.bmm(a, a.transpose(1, 2))).sum()
            scaling = members[0][2]
            if scaling != 1.0:
                p = p * (scaling * scaling)
        total = p if total is None else total + p
    return total


def anchored_penalty(bindings: Iterable[AnchorBinding], include_lora_scaling: bool = False,
                     batched: bool = True) -> torch.Tensor | None:
    """`sum_l ||(I - C_l) B_l A_l||_F^2` (times `s_l^2` with `include_lora_scaling`), differentiable.

    Computed in float32 with autocast disabled, whatever the LoRA weights' dtype (bf16 training),
    so the penalty is not quantised away. With `batched` (default), same-shape modules go
    through one batched product per group (`_batched_penalty`); else one module at a time.
    Returns None when there are no bindings.
    """
    if batched:
        return _batched_penalty(list(bindings), include_lora_scaling)
    total: torch.Tensor | None = None
    for bnd in bindings:
        b, a = bnd.target.lora_b, bnd.target.lora_a
        anchor = bnd.anchor_on(b.device)
        with torch.autocast(device_type=b.device.type, enabled=False):
            p = offbasin_penalty(
                b.to(anchor.matrix.dtype),
                a.to(anchor.matrix.dtype),
                anchor,
                bnd.target.scaling if include_lora_scaling else 1.0,
            )
        total = p if total is None else total + p
    return total


def is_sharded(bindings: Iterable[AnchorBinding]) -> bool:
    """Whether the bound LoRA weights are FSDP2 row shards (DTensors sharded on dim 0)."""
    from ..sharding import row_shard

    return any(row_shard(b.target.lora_b, b.target.name) is not None for b in bindings)


def sharded_penalty_terms(bindings: list[AnchorBinding], include_lora_scaling: bool = False) -> tuple[list[torch.Tensor], Any]:
    """This process's part of each module's `||(I - C) s B A||_F^2` under FSDP2, differentiable,
    and the process group; the parts sum over processes to the whole penalty.

    Each process holds rows `[i0, i1)` of `B` (`out x r`) and of its anchor (`C`'s rows, or the
    factor `F`'s rows), and rows of `A` (`r x in`, sharded on `r`). With `M = B - C B`,
    `||M A||^2 = sum((M^T M) * (A A^T))` and `M^T M = sum_i M_i^T M_i` over row blocks, so process
    `i` computes `sum((M_i^T M_i) * (A A^T))` with

    - `A` whole (one all_gather of the `A` rows of all modules together);
    - dense `C`: `(C B)_i = C_i B`, `B` whole from one all_gather;
    - factor `C = F F^T`: `(C B)_i = F_i (F^T B)`, `F^T B = sum_i F_i^T B_i` from one all_reduce.

    No anchor leaves its process: per process the anchors take `1 / world` of their whole size
    (up to `torch.chunk` rounding). The collectives are differentiable so that the gradient
    of each process's part, summed over processes by their backward, is the gradient of the whole
    penalty on this process's rows: a process adds `grad(part)` to its sharded gradients directly.
    """
    from ..sharding import all_reduce_sum, gather_rows, row_shard

    rows: list[tuple[AnchorBinding, Any, Any, Anchor, torch.Tensor, torch.Tensor]] = []
    for bnd in bindings:
        t = bnd.target
        sb, sa = row_shard(t.lora_b, f"{t.name} lora_B"), row_shard(t.lora_a, f"{t.name} lora_A")
        if sb is None:
            raise ValueError(f"AsFT: LoRA module {t.name!r}: lora_B is not sharded while others are (mixed engines)")
        b_loc, a_loc = cast(Any, t.lora_b).to_local(), cast(Any, t.lora_a).to_local()
        anchor = bnd.anchor_rows(sb.start, sb.stop, b_loc.device)
        dtype = anchor.matrix.dtype
        rows.append((bnd, sb, sa, anchor, b_loc.to(dtype), a_loc.to(dtype)))
    if not rows:
        return [], None
    group = rows[0][1].group
    with torch.autocast(device_type=rows[0][4].device.type, enabled=False):
        to_gather: list[tuple[torch.Tensor, Any]] = [(a, sa) for _, _, sa, _, _, a in rows if sa is not None]
        to_gather += [(b, sb) for _, sb, _, anc, b, _ in rows if anc.kind == "dense"]
        fulls = iter(gather_rows(to_gather))
        a_full = [next(fulls) if sa is not None else a for _, _, sa, _, _, a in rows]
        b_full = {i: next(fulls) for i, (_, _, _, anc, _, _) in enumerate(rows) if anc.kind == "dense"}
        factor_ix = [i for i, r in enumerate(rows) if r[3].kind == "factor"]
        ftb = dict(zip(factor_ix, all_reduce_sum([rows[i][3].matrix.transpose(0, 1) @ rows[i][4] for i in factor_ix], group)))
        parts: list[torch.Tensor] = []
        for i, (bnd, _sb, _sa, anchor, b, _a) in enumerate(rows):
            cb = anchor.matrix @ b_full[i] if anchor.kind == "dense" else anchor.matrix @ ftb[i]
            m = b - cb
            p = ((m.transpose(0, 1) @ m) * (a_full[i] @ a_full[i].transpose(0, 1))).sum()
            s = bnd.target.scaling if include_lora_scaling else 1.0
            parts.append(p * (s * s) if s != 1.0 else p)
    return parts, group
