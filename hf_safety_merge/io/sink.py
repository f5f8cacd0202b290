"""The card sink: the engine and vectors write README cards through this interface, never importing `cards`.

`hf_safety_merge.cards` implements :class:`CardSink` and registers it on import (the package
root imports it, so a sink is always there); a caller may register another (e.g. a no-op).
"""

from __future__ import annotations

import contextlib
import threading
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

    # Optional: `prepare(self) -> None` loads what writing a card needs (imports); the engine
    # calls it on a background thread as a merge starts (`prepare_in_background`).


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


def prepare_in_background() -> threading.Thread | None:
    """Start the sink's optional `prepare()` on a daemon thread, so that what writing the card
    needs (for this package's cards: jinja2 and `huggingface_hub.repocard_data`, ~0.07 s of
    imports) loads while the merge reads and writes tensors, instead of after them. Returns the
    thread (join it before leaving), or None when the sink has nothing to prepare. A failure in
    `prepare` is left for the card writing itself to raise."""
    prepare = getattr(card_sink(), "prepare", None)
    if prepare is None:
        return None

    def run() -> None:
        with contextlib.suppress(Exception):  # writing the card raises it, where it belongs
            prepare()

    t = threading.Thread(target=run, name="card-prepare", daemon=True)
    t.start()
    return t
