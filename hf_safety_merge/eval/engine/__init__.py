"""A vLLM server that this library starts, feeds and stops: the managed engine behind
``backend="vllm"``.

vLLM pins its own torch and transformers, so it lives in its own virtual environment; the engine
runs ``<that python> -m vllm.entrypoints.openai.api_server`` for a model folder on 127.0.0.1 at a
free port, waits until ``/v1/models`` answers, and talks to it through
:class:`~hf_safety_merge.eval.openai_backend.OpenAIBackend`. The vLLM environment is found from
an explicit path, then ``$HF_SAFETY_VLLM_PYTHON`` (a python executable or a virtual environment
folder), then this interpreter when ``import vllm`` works here (:func:`find_vllm_python`).

Stopping is clean: the server runs in its own process group (``start_new_session``) under a
small supervisor (stdlib Python, the group's leader), and :meth:`VLLMEngine.stop` signals the
whole group (SIGTERM, then SIGKILL after a grace period), so vLLM's engine-core and worker
processes go with it. ``with VLLMEngine(...)`` and an ``atexit`` hook stop it on an exception or
Ctrl-C; when the process that started it dies without cleaning up (SIGKILL), the supervisor sees
its parent change (and, on Linux, gets a parent-death signal) and takes the group down. A
parent-death signal on the vLLM server itself is not enough: vLLM 0.32's API server, signalled
during its start-up, kept running as an orphan (measured here), hence the supervisor.

Several models of one architecture in turn (study rows, calibration probes): :meth:`VLLMEngine.serve`
loads the new weights into the running engine (vLLM's ``reload_weights`` worker method through the
dev-mode ``/collective_rpc`` endpoint, ``weights_path=<folder>``), then clears the prefix cache,
instead of a restart; a folder whose config or tokenizer differs gets a fresh server. The dev-mode
endpoints are only ever exposed on 127.0.0.1 by this class.

Modules: `config` (`EngineConfig`, `find_vllm_python`, `resolve_backend`), `process` (the
supervisor and process-group helpers), `server` (`VLLMEngine`), `shared` (`shared_engine`,
`close_shared_engines`). Layer 2 (docs/architecture.md): may import `errors`, `validation`,
`assets`, `testing` and `io`.
"""

from .config import ENGINE_PYTHON_ENV, EngineConfig, EngineError, find_vllm_python, resolve_backend
from .server import VLLMEngine
from .shared import close_shared_engines, shared_engine

__all__ = [
    "ENGINE_PYTHON_ENV",
    "EngineConfig",
    "EngineError",
    "VLLMEngine",
    "close_shared_engines",
    "find_vllm_python",
    "resolve_backend",
    "shared_engine",
]
