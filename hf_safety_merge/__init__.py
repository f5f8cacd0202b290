"""hf-safety-merge: keep fine-tuned LLMs safe, the Hugging Face way.

Layer 6, the public surface (docs/architecture.md): re-exports from every layer below, and imports `cards` so that the card sink is registered.
"""

__version__ = "0.1.0"

import gc as _gc
from typing import TYPE_CHECKING, Any

# Importing torch, pydantic and this package makes a few hundred thousand objects, and on the way
# the cyclic garbage collector walks all of them (three full collections, ~0.18 s on 2 cores,
# measured with gc.callbacks), while the import leaves next to no garbage. So collection is
# paused for the import, and the objects it made are then moved to the oldest generation without
# a walk (`gc.freeze()` then `gc.unfreeze()`: two list splices), so turning the collector back on
# does not start one young collection of all of them (that alone was 0.10 s, 7k objects
# collected out of ~300k). What garbage there is gets collected by the next full collection, as
# usual. Objects someone else froze stay frozen (then only the pause applies), and the caller's
# setting is restored.
_gc_was_enabled = _gc.isenabled()
_gc.disable()
try:
    from . import cards as _cards  # noqa: F401  (registers the card sink the engine writes through)
    from .errors import CheckpointError, ConfigError, NonFiniteError, PlanError, SafetyMergeError
    from .io.checkpoints import LoraCheckpoint, SafetensorsCheckpoint, TensorSource
    from .io.filters import TensorFilter
    from .io.hub import HubCheckpoint, HubError, open_checkpoint, push_folder
    from .merge import MergeResult, apply_safety_vector, available_methods, merge
    from .merge.config import SafetyMergeConfig
    from .modeling import (
        AutoSafeModelForCausalLM,
        SafetyVectorMixin,
        add_safety_vector_support,
        load_safety_vector,
    )
    from .vectors import SafetyVector, SafetyVectorConfig
finally:
    if _gc.get_freeze_count() == 0:
        _gc.freeze()
        _gc.unfreeze()
    if _gc_was_enabled:
        _gc.enable()

if TYPE_CHECKING:
    from .calibrate.repair import RepairConfig, repair
    from .eval import evaluate_safety
    from .monitor import SafetyMonitorCallback, SafetyMonitorConfig
    from .training import SafetyPeftMixin, add_safety_mixin
    from .training.asft import AsFTConfig, AsFTTrainer
    from .training.safekey import SafeKeyConfig, SafeKeyTrainer
    from .training.safekey.data import prepare_safekey_dataset

# Names whose modules need the optional extras (trl, evaluation deps): imported on first use.
_LAZY = {
    "AsFTConfig": "hf_safety_merge.training.asft",
    "AsFTTrainer": "hf_safety_merge.training.asft",
    "SafeKeyConfig": "hf_safety_merge.training.safekey",
    "SafeKeyTrainer": "hf_safety_merge.training.safekey",
    "SafetyPeftMixin": "hf_safety_merge.training",
    "SafetyMonitorCallback": "hf_safety_merge.monitor",
    "SafetyMonitorConfig": "hf_safety_merge.monitor",
    "RepairConfig": "hf_safety_merge.calibrate",
    "repair": "hf_safety_merge.calibrate",
    "add_safety_mixin": "hf_safety_merge.training",
    "evaluate_safety": "hf_safety_merge.eval",
    "prepare_safekey_dataset": "hf_safety_merge.training.safekey.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsFTConfig",
    "AsFTTrainer",
    "AutoSafeModelForCausalLM",
    "CheckpointError",
    "ConfigError",
    "HubCheckpoint",
    "HubError",
    "LoraCheckpoint",
    "MergeResult",
    "NonFiniteError",
    "PlanError",
    "RepairConfig",
    "SafeKeyConfig",
    "SafeKeyTrainer",
    "SafetensorsCheckpoint",
    "SafetyMergeConfig",
    "SafetyMergeError",
    "SafetyMonitorCallback",
    "SafetyMonitorConfig",
    "SafetyPeftMixin",
    "SafetyVector",
    "SafetyVectorConfig",
    "SafetyVectorMixin",
    "TensorFilter",
    "TensorSource",
    "__version__",
    "add_safety_mixin",
    "add_safety_vector_support",
    "apply_safety_vector",
    "available_methods",
    "evaluate_safety",
    "load_safety_vector",
    "merge",
    "open_checkpoint",
    "prepare_safekey_dataset",
    "push_folder",
    "repair",
]
