"""Managed engines shared across calls: `shared_engine` keeps one server at a time (they share
the cores) for successive evaluations, `close_shared_engines` stops them.

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `assets`, `testing` and `io`.
"""

from __future__ import annotations

import os
from typing import Any

from .config import EngineConfig
from .server import VLLMEngine

_SHARED: dict[tuple[Any, ...], VLLMEngine] = {}


def shared_engine(model: str | os.PathLike[str], config: EngineConfig | None = None) -> VLLMEngine:
    """The process-wide engine for ``config``, serving ``model`` (started, reloaded or
    restarted as needed; see :meth:`VLLMEngine.serve`). One engine per configuration runs at a
    time: models evaluated in turn share it. Stopped at exit or by :func:`close_shared_engines`."""
    cfg = config or EngineConfig()
    key = cfg.key()
    for k in [k for k in _SHARED if k != key]:  # one server at a time: they share the cores
        _SHARED.pop(k).close()
    eng = _SHARED.get(key)
    if eng is None:
        eng = _SHARED[key] = VLLMEngine(model, cfg)
    eng.serve(model)
    return eng


def close_shared_engines() -> None:
    """Stop every engine :func:`shared_engine` started."""
    while _SHARED:
        _SHARED.popitem()[1].close()
