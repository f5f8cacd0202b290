"""What several commands share: the Namespace-to-keywords helper and the generation-backend options.

    p = argparse.ArgumentParser()
    add_backend_arguments(p)                      # --backend, --base-url, --served-model, ...
    args = p.parse_args()
    cfg = SafetyEvalConfig(..., **backend_options(args))   # backend, server, engine

Nothing here imports the evaluation package at module level: `merge` and `repair` add their
probe-backend options without it (the CLI starts fast).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_backend_arguments", "add_probe_backend_arguments", "apply_probe_backend", "backend_epilog",
           "backend_options", "options"]


#: the merge config example both `--help` texts show
MERGE_CONFIG_EXAMPLE = """a merge config (YAML):
  task_model: ./my-finetune          # or a Hub repo id
  task_reference: ./aligned          # the model before fine-tuning (for tau)
  safety_vector: ./vector
  method: enchtable                  # enchtable | task_arithmetic (resta) | safe_lora | ties | dare
  parameters: {beta: 0.1, gamma: 0.5, lam: 200}
"""

def options(args: argparse.Namespace, *names: str, only_given: bool = False, **renamed: str) -> dict[str, Any]:
    """Keyword arguments from parsed options: ``{name: args.name}`` for each of `names`, and
    ``{key: args.<dest>}`` for each ``key=dest`` of `renamed` (an option spelled differently from
    the keyword it feeds). With `only_given`, only the options the command line set: those whose
    value is not None, False, 0 or empty (their defaults mean "not given", so the config's own
    default applies)."""
    out: dict[str, Any] = {}
    for key, dest in [*((n, n) for n in names), *renamed.items()]:
        value = getattr(args, dest, None)
        if value or not only_given:
            out[key] = value
    return out


# ------------------------------------------------------------------ the generation backend (eval)
def backend_epilog() -> str:
    """The `--backend` section of a generating command's epilog."""
    from ..eval.engine import ENGINE_PYTHON_ENV
    from ..eval.openai_backend import DEFAULT_API_KEY_ENV

    return f"""generation backends (--backend):
  transformers  in this process (default)
  openai        an OpenAI-compatible server you run (vLLM, SGLang, TGI, llama.cpp): --base-url URL; the API key
                is read from ${DEFAULT_API_KEY_ENV} (or --api-key-env NAME), never from the command line
  vllm          a vLLM server started and stopped here, from vLLM's own environment (--vllm-python or
                ${ENGINE_PYTHON_ENV}); models evaluated in turn reuse it (weights reloaded, no restart)
  auto          vllm when a vLLM environment is found, else transformers
"""


def add_backend_arguments(parser: argparse.ArgumentParser, default: str = "transformers") -> argparse._ArgumentGroup:
    """Add the backend options to ``parser`` (in their own group) and return the group."""
    from ..eval.engine import ENGINE_PYTHON_ENV
    from ..eval.openai_backend import DEFAULT_API_KEY_ENV

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
    from ..eval.engine import EngineConfig
    from ..eval.openai_backend import OpenAIServer

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


# ------------------------------------------------------------ where calibration probes generate
def add_probe_backend_arguments(p: argparse.ArgumentParser) -> None:
    """`--backend` and `--vllm-python` of the commands that calibrate (`merge --calibrate`, `repair`)."""
    g = p.add_argument_group("where calibration probes generate")
    g.add_argument("--backend", choices=["transformers", "vllm", "auto"], default=None,
                   help="transformers (in process, default), vllm (a managed vLLM server from vLLM's own environment; "
                   "each probe's weights are reloaded into it) or auto (vllm when one is found)")
    g.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="vLLM's python or virtual environment (default $HF_SAFETY_VLLM_PYTHON)")


def apply_probe_backend(cal: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A calibration mapping with the probe-backend options the command line set."""
    return {**cal, **options(args, "backend", "vllm_python", only_given=True)}
