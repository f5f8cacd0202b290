"""NTK-linearised safety-vector distillation (EnchTable, stage 1).

- :func:`distill_safety_vector`: aligned model + harmful QA -> a saved :class:`~hf_safety_merge.SafetyVector`
  (`theta_aligned - theta_harmful` on the trained tensors only), with a card recording the data,
  variant, steps, loss curve and time. CLI: `hf-safety-merge distill`.
- :class:`DistillConfig` / :class:`DistillTrainer`: the same as a TRL `SFTConfig` / `SFTTrainer`
  pair (logging, checkpointing, gradient accumulation, bf16, `accelerate launch`).
- :class:`LinearizedModule`, :func:`linearize_model`, :func:`unlinearize_model`: the first-order
  Taylor expansion `f(x; theta0) + J f(x; theta0)(theta - theta0)` of whole blocks
  (`torch.func.jvp` over `functional_call`); the variants `ffn` / `attn` / `attn_ffn` are the
  EnchTable reference's, `attn_block` / `attn_block_ffn` extensions (see :data:`VARIANT_DESCRIPTIONS`).
- :func:`load_harmful_qa`, :func:`generate_responses`: data in, surrogate harmful answers out.

`DistillConfig`, `DistillTrainer` and `distill_safety_vector` need `trl`; they are imported lazily.

Layer 5 (docs/architecture.md): may import `vectors`, `io`, `errors`, `validation`; `distill.cli` is layer 7.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .data import generate_responses, load_harmful_qa, read_prompts
from .linearize import (
    ATTN_NAMES,
    DEPRECATED_VARIANTS,
    MLP_NAMES,
    VARIANT_BLOCKS,
    VARIANT_DESCRIPTIONS,
    VARIANTS,
    LinearizationPlan,
    LinearizedModule,
    delta_tensors,
    find_decoder_layers,
    linearize_model,
    linearized_modules,
    resolve_layer_range,
    resolve_variant,
    theta0_nbytes,
    unlinearize_model,
)

if TYPE_CHECKING:
    from .api import DistillResult, distill_safety_vector
    from .cli import add_distill_parser
    from .trainer import DistillConfig, DistillTrainer

_LAZY = {
    "DistillConfig": "trainer",
    "DistillTrainer": "trainer",
    "distill_safety_vector": "api",
    "DistillResult": "api",
    "add_distill_parser": "cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTN_NAMES",
    "DEPRECATED_VARIANTS",
    "MLP_NAMES",
    "VARIANTS",
    "VARIANT_BLOCKS",
    "VARIANT_DESCRIPTIONS",
    "DistillConfig",
    "DistillResult",
    "DistillTrainer",
    "LinearizationPlan",
    "LinearizedModule",
    "add_distill_parser",
    "delta_tensors",
    "distill_safety_vector",
    "find_decoder_layers",
    "generate_responses",
    "linearize_model",
    "linearized_modules",
    "load_harmful_qa",
    "read_prompts",
    "resolve_layer_range",
    "resolve_variant",
    "theta0_nbytes",
    "unlinearize_model",
]
