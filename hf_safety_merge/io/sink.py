"""The card sink: the engine and vectors write README cards through this interface, never importing `cards`.

`hf_safety_merge.cards` implements :class:`CardSink` and registers it on import (the package
root imports it, so a sink is always there); a caller may register another (e.g. a no-op).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Card(Protocol):
    def save(self, filepath: Path) -> None: ...


class CardSink(Protocol):
    def merged_model_card(self, config: Any, result: Any, *, task_display: str, vector: Any) -> Card:
        """The merged model's card (config: SafetyMergeConfig, result: MergeResult, vector: SafetyVector)."""
        ...

    def safety_vector_card(self, cfg: Any) -> Card:
        """A safety vector's card (cfg: SafetyVectorConfig)."""
        ...


_SINK: CardSink | None = None


def register_card_sink(sink: CardSink) -> None:
    """Make `sink` the writer of every card from now on."""
    global _SINK
    _SINK = sink


def card_sink() -> CardSink:
    """The registered sink."""
    if _SINK is None:
        raise RuntimeError("no card sink registered: import hf_safety_merge.cards (or register one with register_card_sink)")
    return _SINK
