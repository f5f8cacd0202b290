"""The merge methods: the registry and interface (`base`), one file per method, each reading like its
equation (`enchtable`, `task_arithmetic` (RESTA), `safe_lora`, `ties_dare`), EnchTable's pure tensor
maths (`interference`), the NaN/Inf guard (`finite`) and the plain-words description of a merge
(`describe`).

Layer 2 (docs/architecture.md): imports only `errors` and `validation`; knows no engine, no I/O.
Importing this package registers every built-in method.
"""

from . import enchtable, safe_lora, task_arithmetic, ties_dare  # noqa: F401  (register the methods)
from .base import MergeMethod, available_methods, build_method, get_method_class, register
from .interference import interference_score
from .safe_lora import safe_lora_project

__all__ = [
    "MergeMethod",
    "available_methods",
    "build_method",
    "get_method_class",
    "interference_score",
    "register",
    "safe_lora_project",
]
