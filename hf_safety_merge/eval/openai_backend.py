"""Generation on any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp's server).

:class:`OpenAIServer` says where the server is and how to talk to it; :class:`OpenAIBackend`
implements the :class:`~hf_safety_merge.eval.backends.Backend` protocol over its
``/v1/completions`` endpoint. Prompts are rendered locally with the model's tokenizer (the same
chat template and assistant-turn prefill as the transformers backend) and sent as token ids by
default, so the server computes on exactly the tokens the transformers backend would; decoding is
greedy unless sampling is asked for.

Requests run ``concurrency`` at a time on threads over one HTTP connection pool (httpx). A
connection error, a timeout, HTTP 429 or a 5xx answer is retried with exponential back-off
(``Retry-After`` honoured); other errors are not. Every failure reads as one line naming the
server and the cause: an unreachable server, a model name the server does not serve (with the
names it does), a prompt longer than the server's context length (checked before anything is
sent when the server reports its length, as vLLM does), a rejected API key.

The API key is read from an environment variable (``api_key_env``) when a request is made; it is
never stored on the object, put in a message, logged or written.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError
from .backends import GenerationError

if TYPE_CHECKING:
    from .generation_config import GenerationSettings

__all__ = ["DEFAULT_API_KEY_ENV", "OpenAIBackend", "OpenAIServer", "RequestFailure", "ServerError"]

logger = logging.getLogger(__name__)

#: the environment variable the API key is read from unless ``api_key_env`` names another
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ServerError(GenerationError):
    """The generation server cannot be used (unreachable, wrong model, rejected key, ...); the
    message is one line that names the server and the cause."""


@dataclass(frozen=True)
class RequestFailure:
    """One request that failed after its retries: ``message`` is one line naming the server."""

    message: str
    retryable: bool = True


def normalize_base_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` (trailing slash or not) -> ``.../v1``."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise ConfigError(f"server base URL {url!r} must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
    return u if u.endswith("/v1") else u + "/v1"


@dataclass
class OpenAIServer:
    """Where an OpenAI-compatible server is and how to talk to it.

    Attributes:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/v1`` is added when missing).
        model: the served model name sent with each request; None: the one model the server
            lists at ``/v1/models`` (an error names them when it serves several).
        api_key_env: the environment variable holding the API key (sent as a bearer token); unset
            or empty: no key is sent. The key itself is never stored here.
        concurrency: requests in flight at once (a server batches them; vLLM's continuous
            batching keeps 32 busy on 2 CPU cores).
        timeout: seconds to wait for one response (a long generation on a busy server takes a
            while); connect_timeout: seconds to open a connection.
        max_retries: retries of one request after a connection error, a timeout, HTTP 429 or 5xx.
        retry_backoff: the first retry's wait in seconds, doubled each time (with jitter, at most
            30 s; a ``Retry-After`` header wins).
        prompt_format: ``tokens`` (default): token ids from the local tokenizer, exactly what the
            transformers backend computes on; ``text``: the rendered text (for a server that takes
            no token ids; the server then tokenizes, without adding special tokens where vLLM
            understands ``add_special_tokens``).
    """

    base_url: str
    model: str | None = None
    api_key_env: str | None = DEFAULT_API_KEY_ENV
    concurrency: int = 32
    timeout: float = 600.0
    connect_timeout: float = 10.0
    max_retries: int = 3
    retry_backoff: float = 1.0
    prompt_format: Literal["tokens", "text"] = "tokens"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.base_url = normalize_base_url(self.base_url)
        if self.concurrency < 1:
            raise ConfigError(f"server concurrency must be >= 1, got {self.concurrency}")
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("server timeouts must be > 0 seconds")
        if self.max_retries < 0 or self.retry_backoff < 0:
            raise ConfigError("server max_retries and retry_backoff must be >= 0")
        if self.prompt_format not in ("tokens", "text"):
            raise ConfigError(f"server prompt_format must be 'tokens' or 'text', got {self.prompt_format!r}")

    def api_key(self) -> str | None:
        """The key from ``api_key_env`` now (None when unset); never stored."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def describe(self) -> str:
        """``server <url>`` plus the model when set: the prefix of every error line."""
        return f"server {self.base_url}" + (f" (model {self.model!r})" if self.model else "")


def _one_line(text: str, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _error_detail(resp: Any) -> str:
    """The server's error message from an OpenAI-style body, or the body's start."""
    try:
        body = resp.json()
    except ValueError:
        return _one_line(resp.text or resp.reason_phrase or "")
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return _one_line(str(err.get("message") or err.get("detail") or err))
        return _one_line(str(err))
    return _one_line(str(body))


def _is_context_error(status: int, detail: str) -> bool:
    d = detail.lower()
    return status in (400, 413, 422) and any(
        s in d for s in ("context length", "maximum context", "context_length", "too long", "max_model_len",
                         "exceeds the", "longer than the maximum", "input validation error"))


class OpenAIBackend:
    """Generation through an OpenAI-compatible ``/v1/completions`` endpoint.

    Args:
        server: an :class:`OpenAIServer`.
        tokenizer: the model's tokenizer (renders the chat template, counts and encodes tokens;
            a served 70B model needs only its tokenizer files here).

    The first generation call checks the server (``GET /v1/models``): reachable, serving the
    model, and its context length when the server reports one.
    """

    def __init__(self, server: OpenAIServer, tokenizer: Any) -> None:
        server.validate()
        self.server = server
        self.tokenizer = tokenizer
        self.model: str | None = server.model
        self.max_model_len: int | None = None
        self._checked = False
        self._lock = threading.Lock()
        self._client: Any = None
        self.stats = {"requests": 0, "retries": 0, "failed": 0}

    # -- HTTP -----------------------------------------------------------------------------------

    def _http(self) -> Any:
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=self.server.concurrency, max_keepalive_connections=self.server.concurrency)
            timeout = httpx.Timeout(self.server.timeout, connect=self.server.connect_timeout)
            self._client = httpx.Client(timeout=timeout, limits=limits, trust_env=False)
        return self._client

    def _headers(self) -> dict[str, str]:
        key = self.server.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _scrub(self, text: str) -> str:
        key = self.server.api_key()
        return text.replace(key, "***") if key else text

    def close(self) -> None:
        """Close the HTTP connections (a later call opens new ones)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, json_body: dict[str, Any] | None = None) -> Any:
        """One request with retries; returns the parsed JSON body or a :class:`RequestFailure`."""
        import httpx

        url = f"{self.server.base_url}{path}"
        where = self.server.describe()
        last = RequestFailure(f"{where}: no attempt made")
        for attempt in range(self.server.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
            wait_s: float | None = None
            try:
                resp = self._http().request(method, url, json=json_body, headers=self._headers())
            except httpx.ConnectError as e:
                cause = "connection refused" if "refused" in str(e).lower() else _one_line(str(e) or type(e).__name__)
                last = RequestFailure(f"cannot reach {where}: {cause} (is the server running? check --base-url)")
            except httpx.TimeoutException as e:
                kind = "connect" if isinstance(e, httpx.ConnectTimeout) else "response"
                limit = self.server.connect_timeout if kind == "connect" else self.server.timeout
                last = RequestFailure(f"{where}: no {kind} within {limit:g} s (raise --request-timeout, or lower --concurrency)")
            except httpx.HTTPError as e:
                last = RequestFailure(f"{where}: {type(e).__name__}: {_one_line(str(e))}")
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        return RequestFailure(f"{where}: answered {path} with a body that is not JSON: {_one_line(resp.text, 120)}", False)
                detail = self._scrub(_error_detail(resp))
                status = resp.status_code
                if status in (401, 403):
                    env = self.server.api_key_env or "the API key variable"
                    sent = "a key from $" + env if self.server.api_key() else f"no key (${env} is unset)"
                    return RequestFailure(f"{where} rejected the request (HTTP {status}; {sent}): {detail}", False)
                if status == 404 and path == "/completions" and "model" in detail.lower():
                    return RequestFailure(f"{where} does not serve that model (HTTP 404): {detail}", False)
                if _is_context_error(status, detail):
                    return RequestFailure(f"{where}: prompt over the context length (HTTP {status}): {detail}", False)
                if status not in _RETRY_STATUS:
                    return RequestFailure(f"{where}: HTTP {status} on {path}: {detail}", False)
                last = RequestFailure(f"{where}: HTTP {status} on {path}: {detail}")
                ra = resp.headers.get("retry-after")
                if ra:
                    try:
                        wait_s = min(float(ra), 60.0)
                    except ValueError:
                        wait_s = None
            if attempt < self.server.max_retries:
                if wait_s is None:
                    wait_s = min(self.server.retry_backoff * 2**attempt, 30.0) * (0.5 + random.random() / 2)
                time.sleep(wait_s)
        if self.server.max_retries:
            return RequestFailure(f"{last.message} (after {self.server.max_retries + 1} attempts)")
        return last

    # -- checks ---------------------------------------------------------------------------------

    def check(self) -> None:
        """``GET /v1/models``: raise :class:`ServerError` (one line) when the server is
        unreachable or does not serve the model; learn the model name (when unset) and the
        server's context length (when reported)."""
        if self._checked:
            return
        body = self._request("GET", "/models")
        if isinstance(body, RequestFailure):
            raise ServerError(body.message)
        data = body.get("data", []) if isinstance(body, dict) else []
        served = {str(d.get("id")): d for d in data if isinstance(d, dict) and d.get("id") is not None}
        if self.model is None:
            if len(served) != 1:
                raise ServerError(f"{self.server.describe()} serves {len(served)} models ({', '.join(sorted(served)) or 'none'}); "
                                  "name one with --served-model")
            self.model = next(iter(served))
        elif served and self.model not in served:
            raise ServerError(f"{self.server.describe()} does not serve model {self.model!r}; it serves: "
                              f"{', '.join(repr(s) for s in sorted(served))}")
        info = served.get(self.model, {})
        mml = info.get("max_model_len") or info.get("context_length") or info.get("max_context_length")
        self.max_model_len = int(mml) if isinstance(mml, (int, float)) and mml > 0 else None
        self._checked = True

    # -- Backend protocol -----------------------------------------------------------------------

    def _add_special(self) -> bool:
        # The chat template already holds BOS when the model needs one (as TransformersBackend).
        return not bool(getattr(self.tokenizer, "chat_template", None))

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(x) for x in self.tokenizer(list(texts), add_special_tokens=self._add_special())["input_ids"]]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(x) for x in self._ids(texts)]

    def _body(self, prompt: Any, config: GenerationSettings) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt, "max_tokens": config.max_new_tokens, "n": 1,
                                "stream": False}
        if config.do_sample:
            body.update(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
        else:
            body.update(temperature=0.0, top_p=1.0)
        if self.server.prompt_format == "text":
            body["add_special_tokens"] = self._add_special()
        return body

    def _one(self, prompt: Any, config: GenerationSettings) -> tuple[str, int] | RequestFailure:
        with self._lock:
            self.stats["requests"] += 1
        body = self._request("POST", "/completions", self._body(prompt, config))
        if isinstance(body, RequestFailure):
            return body
        try:
            choice = body["choices"][0]
            text = str(choice.get("text") or "")
        except (KeyError, IndexError, TypeError, AttributeError):
            return RequestFailure(f"{self.server.describe()}: a completion without choices[0].text: {_one_line(str(body), 120)}", False)
        usage = body.get("usage") or {}
        n = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if not isinstance(n, int):
            n = len(self._ids([text])[0]) if text else 0
        elif choice.get("finish_reason") == "stop" and n > 0 and not isinstance(choice.get("stop_reason"), str):
            # stopped by an end-of-sequence token (no stop strings are sent): the server counts
            # it, the transformers backend does not (n = tokens before the first eos)
            n -= 1
        return text, n

    def generate_unordered(self, texts: Sequence[str], config: GenerationSettings) -> Iterator[tuple[int, tuple[str, int] | RequestFailure]]:
        """``(index, result)`` for every text as responses arrive (``concurrency`` in flight);
        a result is ``(text, generated tokens)`` or a :class:`RequestFailure`.

        Raises :class:`ServerError` before sending anything when the server cannot be used, or
        when a prompt plus ``max_new_tokens`` exceeds the context length the server reports.
        """
        if not texts:
            return
        self.check()
        ids = self._ids(texts)
        if self.max_model_len is not None:
            over = [i for i, x in enumerate(ids) if len(x) + config.max_new_tokens > self.max_model_len]
            if over:
                longest = max(len(ids[i]) for i in over)
                raise ServerError(
                    f"{self.server.describe()}: {len(over)} prompt(s) over the context length: the longest has {longest} "
                    f"tokens + {config.max_new_tokens} new > max_model_len {self.max_model_len} (serve with a larger "
                    "--max-model-len, or lower --max-new-tokens)")
        prompts: list[Any] = ids if self.server.prompt_format == "tokens" else list(texts)
        with ThreadPoolExecutor(self.server.concurrency, thread_name_prefix="openai-gen") as pool:
            pending: dict[Future[Any], int] = {}
            it = iter(range(len(prompts)))
            try:
                for i in it:
                    pending[pool.submit(self._one, prompts[i], config)] = i
                    if len(pending) >= self.server.concurrency:
                        break
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = pending.pop(f)
                        res = f.result()
                        if isinstance(res, RequestFailure):
                            with self._lock:
                                self.stats["failed"] += 1
                        yield i, res
                        nxt = next(it, None)
                        if nxt is not None:
                            pending[pool.submit(self._one, prompts[nxt], config)] = nxt
            finally:
                for f in pending:
                    f.cancel()

    def generate_batch(self, texts: Sequence[str], config: GenerationSettings) -> list[tuple[str, int]]:
        """All texts at once (``concurrency`` in flight); raises :class:`ServerError` on the
        first failure (the :class:`Generator` uses :meth:`generate_unordered` and keeps what
        succeeded)."""
        out: list[tuple[str, int] | None] = [None] * len(texts)
        failures: list[RequestFailure] = []
        for i, res in self.generate_unordered(texts, config):
            if isinstance(res, RequestFailure):
                failures.append(res)
            else:
                out[i] = res
        if failures:
            raise ServerError(f"{len(failures)} of {len(texts)} requests failed: {failures[0].message}")
        return [r for r in out if r is not None]

    def describe(self) -> str:
        return self.server.describe()
