"""AsFT: anchoring safety during LoRA fine-tuning (`L = L_task + lambda * sum_l ||(I - C_l) B_l A_l||_F^2`).

Owns `AsFTConfig` (`config`), `AsFTTrainer` (`trainer`, the loss and its accumulation/DDP
semantics), the alignment anchors `C_l` (`projector`: one module's, and the penalty maths;
`anchors`: a model's, computed, cached, loaded) and the PEFT mixin usable without a trainer
(`peft_mixin`). Layer 2 (docs/architecture.md): may import `io`, `errors`, `validation`. The config and trainer need `trl` and
load on first use; the anchors and the mixin need only `peft`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .anchors import AlignmentAnchors
from .peft_mixin import SafetyPeftMixin, add_safety_mixin, anchored_penalty, find_lora_targets
from .projector import (
    Anchor,
    basin_components,
    build_anchor,
    naive_offbasin_penalty,
    offbasin_penalty,
)

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
