"""Merge methods behind one registry, and the streaming merge engine (plan -> stream -> sink).

Owns: the registry and method interface (`base`), one file per method (`enchtable`,
`task_arithmetic`, `safe_lora`, `ties_dare`), their pure tensor maths
(`interference`) and the engine (`engine`). Layer 2 for the registry and the method files, layer 5
for the engine and this package (docs/architecture.md): may import `io`, `config`, `vectors`, `errors`,
`validation`; cards are written through `io.sink`, never imported.
"""

from typing import Any

from . import enchtable, safe_lora, task_arithmetic, ties_dare  # noqa: F401  (register the methods)
from .base import MergeMethod, available_methods, build_method, get_method_class, register
from .engine import MergeResult, merge
from .interference import interference_score
from .safe_lora import safe_lora_project

__all__ = [
    "MergeMethod",
    "MergeResult",
    "available_methods",
    "build_method",
    "get_method_class",
    "interference_score",
    "merge",
    "register",
    "safe_lora_project",
]


def __getattr__(name: str) -> Any:
    if name == "methods":  # the old all-methods module, reachable as an attribute too
        import importlib

        return importlib.import_module(f"{__name__}.methods")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
