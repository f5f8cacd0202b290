"""`Row`: one model the study evaluates (its folder and adapter, what it repairs, its group, its setting).

Layer 6 (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    """One model the study evaluates: its folder (and LoRA adapter), what it repairs, its group."""

    name: str
    model: Path
    adapter: Path | None = None
    repairs: str | None = None  # the broken model it repairs (or is trained instead of)
    method: str | None = None  # method family (enchtable, resta, ...)
    group: str = "headline"  # "headline" (full evaluation) or "sweep"
    setting: str = ""
