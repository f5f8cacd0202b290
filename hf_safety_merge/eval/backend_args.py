"""Command-line options of the generation backend, shared by every command that generates
(``eval``, ``calibrate``, ``repair``, the study, ``demo``).

    p = argparse.ArgumentParser()
    add_backend_arguments(p)                      # --backend, --base-url, --served-model, ...
    args = p.parse_args()
    cfg = SafetyEvalConfig(..., **backend_options(args))   # backend, server, engine
"""

from __future__ import annotations

import argparse
from typing import Any

from .engine import ENGINE_PYTHON_ENV, EngineConfig
from .openai_backend import DEFAULT_API_KEY_ENV, OpenAIServer

__all__ = ["BACKEND_EPILOG", "add_backend_arguments", "backend_options"]

BACKEND_EPILOG = f"""generation backends (--backend):
  transformers  in this process (default)
  openai        an OpenAI-compatible server you run (vLLM, SGLang, TGI, llama.cpp): --base-url URL; the API key
                is read from ${DEFAULT_API_KEY_ENV} (or --api-key-env NAME), never from the command line
  vllm          a vLLM server started and stopped here, from vLLM's own environment (--vllm-python or
                ${ENGINE_PYTHON_ENV}); models evaluated in turn reuse it (weights reloaded, no restart)
  auto          vllm when a vLLM environment is found, else transformers
"""


def add_backend_arguments(parser: argparse.ArgumentParser, default: str = "transformers") -> argparse._ArgumentGroup:
    """Add the backend options to ``parser`` (in their own group) and return the group."""
    g = parser.add_argument_group("generation backend")
    g.add_argument("--backend", default=default, choices=["transformers", "openai", "vllm", "auto"],
                   help=f"where responses are generated (default {default}; see below)")
    g.add_argument("--base-url", default=None, help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (--backend openai)")
    g.add_argument("--served-model", default=None,
                   help="the model name the server serves (default: the one it lists at /v1/models)")
    g.add_argument("--api-key-env", default=DEFAULT_API_KEY_ENV, metavar="NAME",
                   help=f"environment variable holding the server's API key (default {DEFAULT_API_KEY_ENV}; unset: no key)")
    g.add_argument("--concurrency", type=int, default=32, help="requests in flight at once (default 32)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    g.add_argument("--max-retries", type=int, default=3, help="retries per request on connection errors, 429, 5xx (default 3)")
    g.add_argument("--prompt-format", default="tokens", choices=["tokens", "text"],
                   help="send token ids (default; exactly the transformers backend's input) or rendered text")
    g.add_argument("--vllm-python", default=None, metavar="PATH",
                   help=f"vLLM's python or virtual environment for --backend vllm/auto (default ${ENGINE_PYTHON_ENV})")
    g.add_argument("--max-model-len", type=int, default=2048, help="the managed vLLM server's context length (default 2048)")
    g.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra vLLM server argument (repeat), e.g. --vllm-arg=--tensor-parallel-size --vllm-arg=2")
    return g


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """``backend``, ``server`` and ``engine`` for :class:`~hf_safety_merge.eval.suite.SafetyEvalConfig`
    from parsed options (those :func:`add_backend_arguments` added)."""
    from ..errors import ConfigError

    backend = getattr(args, "backend", "transformers")
    base_url = getattr(args, "base_url", None)
    server = None
    if backend == "openai":
        if not base_url:
            raise ConfigError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        server = OpenAIServer(base_url, model=args.served_model, api_key_env=args.api_key_env or None,
                              concurrency=args.concurrency, timeout=args.request_timeout, max_retries=args.max_retries,
                              prompt_format=args.prompt_format)
    elif base_url:
        raise ConfigError(f"--base-url is for --backend openai (got --backend {backend})")
    engine = EngineConfig(python=args.vllm_python, max_model_len=args.max_model_len, extra_args=tuple(args.vllm_arg),
                          concurrency=args.concurrency, request_timeout=args.request_timeout)
    return {"backend": backend, "server": server, "engine": engine}
