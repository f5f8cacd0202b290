"""The streaming merge engine (plan -> stream -> sink) and its declarative config.

Owns: the merge config (`config`: `SafetyMergeConfig`; `calibration_config`: its calibration section;
`mergekit_config`: mergekit's spelling), the plan over the opened inputs (`plan`), the global and
merge passes (`passes`), the read-ahead pipeline (`pipeline`) and the engine (`engine`). The methods
themselves live in :mod:`hf_safety_merge.methods`.

Layer 4 (docs/architecture.md): may import `methods`, `vectors`, `io`, `errors`, `validation`; cards
are written through `io.sink`, never imported.
"""

from ..methods import (  # importing the package registers the built-in methods
    MergeMethod,
    available_methods,
    build_method,
    get_method_class,
    interference_score,
    register,
    safe_lora_project,
)
from .apply import apply_safety_vector
from .config import SafetyMergeConfig
from .engine import merge
from .provenance import verify_inputs
from .result import MergeResult

__all__ = [
    "MergeMethod",
    "MergeResult",
    "SafetyMergeConfig",
    "apply_safety_vector",
    "available_methods",
    "build_method",
    "get_method_class",
    "interference_score",
    "merge",
    "register",
    "safe_lora_project",
    "verify_inputs",
]
