"""Safety-preserving fine-tuning: AsFT and SafeKey as TRL trainers, and a PEFT mixin usable without them.

Owns `asft/` (config, trainer, anchors, the PEFT mixin) and `safekey/` (config, data, collator,
heads, trainer). Layer 2 (docs/architecture.md): may import `io`, `errors` and `validation` only: training never needs the merge
pipeline.

- :class:`AsFTConfig` / :class:`AsFTTrainer`: `SFTConfig` / `SFTTrainer` plus the AsFT
  regulariser `lambda * sum_l ||(I - C_l) B_l A_l||_F^2` on the LoRA weights.
- :class:`AlignmentAnchors`: the per-module `C_l` from `W_aligned - W_base` (streamed, cached as
  safetensors, loadable from a path or the Hub).
- :class:`SafetyPeftMixin` / :func:`add_safety_mixin`: `attach_alignment_anchors`,
  `alignment_drift`, `project_to_safety_basin` on any PEFT LoRA model.

`AsFTConfig`/`AsFTTrainer` need `trl`; they are imported lazily so that the anchors and the mixin
work with `peft` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .asft.anchors import AlignmentAnchors
from .asft.peft_mixin import SafetyPeftMixin, add_safety_mixin, anchored_penalty, find_lora_targets
from .asft.projector import (
    Anchor,
    basin_components,
    build_anchor,
    naive_offbasin_penalty,
    offbasin_penalty,
)

if TYPE_CHECKING:
    from .asft.config import AsFTConfig
    from .asft.trainer import AsFTTrainer
    from .safekey import SafeKeyConfig, SafeKeyTrainer

__all__ = [
    "AlignmentAnchors",
    "Anchor",
    "AsFTConfig",
    "AsFTTrainer",
    "SafeKeyConfig",
    "SafeKeyTrainer",
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
    if name in ("AsFTConfig", "AsFTTrainer"):
        from . import asft

        return getattr(asft, name)
    if name in ("SafeKeyConfig", "SafeKeyTrainer"):
        from . import safekey

        return getattr(safekey, name)
    if name in ("anchors", "peft_mixin", "safekey_data"):  # moved modules, reachable as attributes too
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
