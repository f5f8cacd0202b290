"""AsFT: anchoring safety during LoRA fine-tuning, as a TRL `SFTTrainer`.

Loss per optimiser step: `L = L_task + lambda * sum_l ||(I - C_l) B_l A_l||_F^2`, where
`C_l = V_l V_l^T / ||V_l||_F` (`V_l = W_aligned - W_base`, Safe LoRA's matrix) or a rank-`k`
projector, for every LoRA-adapted module `l`. See :mod:`hf_safety_merge.training.asft.anchors` for the
anchors and the cheap exact form of the penalty.

Gradient accumulation and DDP: the penalty depends on the weights only, so it is identical for
every micro-batch of an optimiser step and on every rank. `AsFTTrainer` adds
`lambda * P / G` to each of the `G` micro-batches' losses (after whatever `Trainer` does to the
task loss), so the accumulated gradient is `lambda * grad P` per optimiser step, whatever `G`; DDP
averages identical penalty gradients across ranks, leaving them unchanged. The task loss itself is
normalised exactly as `SFTTrainer` does (by the number of label tokens over the whole step and
all ranks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .anchors import (
    AlignmentAnchors,
    Anchor,
    basin_components,
    build_anchor,
    naive_offbasin_penalty,
    offbasin_penalty,
)
from .peft_mixin import SafetyPeftMixin, add_safety_mixin, anchored_penalty, find_lora_targets

if TYPE_CHECKING:
    from .config import AsFTConfig
    from .trainer import AsFTTrainer

__all__ = [
    "AlignmentAnchors",
    "Anchor",
    "AsFTConfig",
    "AsFTTrainer",
    "SafetyPeftMixin",
    "add_safety_mixin",
    "anchored_penalty",
    "basin_components",
    "build_anchor",
    "find_lora_targets",
    "naive_offbasin_penalty",
    "offbasin_penalty",
]


def __getattr__(name: str) -> Any:
    # The config and trainer need `trl`; the anchors and the mixin need only `peft`.
    if name == "AsFTConfig":
        from .config import AsFTConfig

        return AsFTConfig
    if name == "AsFTTrainer":
        from .trainer import AsFTTrainer

        return AsFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
