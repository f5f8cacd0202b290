"""NTK-linearised safety-vector distillation (EnchTable, stage 1).

- :class:`DistillConfig` (`config.py`): every distillation setting, declared once: TRL's
  `SFTConfig` plus the linearisation, data selection, aligned-model loading and vector precision.
- :class:`DistillTrainer` (`trainer.py`): its `SFTTrainer` (logging, checkpointing, gradient
  accumulation, bf16, `accelerate launch`); :meth:`DistillTrainer.safety_vector` after training.
- :func:`distill_safety_vector` (`api.py`): `(config, aligned model, harmful QA, output folder)`
  -> a saved :class:`~hf_safety_merge.SafetyVector` (`theta_aligned - theta_harmful` on the
  trained tensors only), with a card recording the data, variant, steps, loss curve and time.
  CLI: `hf-safety-merge distill` (`hf_safety_merge.scripts.distill`, a `TrlParser` script).
- :class:`LinearizedModule` (`ntk.py`): the first-order Taylor expansion
  `f(x; theta0) + J f(x; theta0)(theta - theta0)` of a whole block (`torch.func.jvp` over
  `functional_call`); :func:`linearize_model`, :func:`unlinearize_model`, :func:`delta_tensors`
  (`linearize.py`): the model surgery; the variants (`variants.py`) `ffn` / `attn` / `attn_ffn`
  are the EnchTable reference's, `attn_block` / `attn_block_ffn` extensions (see
  :data:`VARIANT_DESCRIPTIONS`).
- :func:`load_harmful_qa`, :func:`generate_responses` (`data.py`): data in, surrogate harmful
  answers out.

`DistillConfig`, `DistillTrainer` and `distill_safety_vector` need `trl`; they are imported lazily.

Layer 4 (docs/architecture.md): may import `vectors`, `io`, `training`, `errors`, `validation`
and the other lower layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .data import generate_responses, load_harmful_qa, read_prompts
from .linearize import (
    LinearizationPlan,
    delta_tensors,
    find_decoder_layers,
    linearize_model,
    linearized_modules,
    resolve_layer_range,
    theta0_nbytes,
    unlinearize_model,
)
from .ntk import LinearizedModule
from .variants import (
    ATTN_NAMES,
    DEPRECATED_VARIANTS,
    MLP_NAMES,
    VARIANT_BLOCKS,
    VARIANT_DESCRIPTIONS,
    VARIANTS,
    resolve_variant,
)

if TYPE_CHECKING:
    from .api import DistillResult, distill_safety_vector
    from .config import DistillConfig
    from .trainer import DistillTrainer

_LAZY = {
    "DistillConfig": "config",
    "DistillTrainer": "trainer",
    "distill_safety_vector": "api",
    "DistillResult": "api",
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
