"""AsFT's penalty under DeepSpeed ZeRO-3: the penalty as a module of its own, so that DeepSpeed
gathers the partitioned LoRA weights for it.

ZeRO-3 keeps every parameter partitioned (flat, `param.data` empty) outside the forward pass of
the module that owns it, and gathers it again for the backward pass. The penalty reads the LoRA
weights outside their modules, so it runs as the forward of :class:`ZeroPenaltyModule`, a
parameter-free submodule added to the model before DeepSpeed wraps it, with every LoRA weight
registered as an *external parameter* of it (`deepspeed.zero.register_external_parameter`,
DeepSpeed's documented API for a parameter used outside its owner). DeepSpeed then gathers the
weights for the penalty's forward and backward like any module's, and each weight's gradient
(task + penalty) is reduced once per backward.

Anchors stay sharded: process `i` of `w` keeps rows `[i0, i1)` of each anchor (`torch.chunk`
sizes, as under FSDP2) and computes its part of each module's `||(I - C) s B A||^2` with the
gathered (whole) `B` and `A`; the parts sum to the penalty. DeepSpeed averages gradients over
processes, so each process back-propagates `w` times its part (see `AsFTTrainer.compute_loss`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..sharding import all_reduce_sum, chunk_rows
from .binding import AnchorBinding


class ZeroPenaltyModule(nn.Module):
    """Forward: this process's part of each bound module's penalty, a 1-D tensor (one entry per
    binding), differentiable in the LoRA weights (gathered by DeepSpeed ZeRO-3)."""

    def __init__(self, bindings: list[AnchorBinding], include_lora_scaling: bool, rank: int, world: int, group: Any = None) -> None:
        super().__init__()
        import deepspeed

        # plain attributes (not submodules or parameters): nothing of this module is saved
        object.__setattr__(self, "_bindings", bindings)
        self.include_lora_scaling = include_lora_scaling
        self.rank, self.world, self.group = rank, world, group
        for bnd in bindings:
            deepspeed.zero.register_external_parameter(self, bnd.target.lora_a)
            deepspeed.zero.register_external_parameter(self, bnd.target.lora_b)
            out = bnd.anchor.out_features
            bnd.anchor_rows(*chunk_rows(out, rank, world), bnd.anchor.matrix.device)

    def forward(self) -> torch.Tensor:
        bindings = cast("list[AnchorBinding]", self.__dict__["_bindings"])
        rows = []
        for bnd in bindings:
            anchor = bnd.anchor
            b = bnd.target.lora_b.to(anchor.matrix.dtype)
            a = bnd.target.lora_a.to(anchor.matrix.dtype)
            assert anchor.rows is not None
            rows.append((bnd, anchor, b, a, anchor.rows[0], anchor.rows[1]))
        with torch.autocast(device_type=rows[0][2].device.type, enabled=False):
            factor_ix = [i for i, r in enumerate(rows) if r[1].kind == "factor"]
            ftb = dict(zip(factor_ix, all_reduce_sum(
                [rows[i][1].matrix.transpose(0, 1) @ rows[i][2][rows[i][4] : rows[i][5]] for i in factor_ix], self.group)))
            parts = []
            for i, (bnd, anchor, b, a, i0, i1) in enumerate(rows):
                cb = anchor.matrix @ b if anchor.kind == "dense" else anchor.matrix @ ftb[i]
                m = b[i0:i1] - cb
                p = ((m.transpose(0, 1) @ m) * (a @ a.transpose(0, 1))).sum()
                s = bnd.target.scaling if self.include_lora_scaling else 1.0
                parts.append(p * (s * s) if s != 1.0 else p)
        return torch.stack(parts)
