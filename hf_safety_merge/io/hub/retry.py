"""Retried Hub calls: bounded tries with exponential back-off and jitter on transient failures
(HTTP 408, 429, 5xx, dropped connections, timeouts), honouring `Retry-After`; each final
failure becomes one library error naming the repo, the endpoint and the cause.

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

from ...errors import CheckpointError, SafetyMergeError
from .errors import HubError, _as_local_too, _Corrupt, _endpoint, _first_line, _redact, _Transient

logger = logging.getLogger("hf_safety_merge")

#: retries of a Hub call: tries in all, the first back-off (doubled at each retry, with jitter, up
#: to the cap) and the longest wait accepted, also for a `Retry-After`; the environment variables
#: HF_SAFETY_MERGE_HUB_TRIES, HF_SAFETY_MERGE_HUB_BACKOFF and HF_SAFETY_MERGE_HUB_MAX_WAIT (seconds)
#: override them, read at each call
HUB_TRIES = 4
HUB_BACKOFF_S = 1.0
HUB_MAX_WAIT_S = 60.0
#: HTTP statuses worth another try (the Hub or a proxy is busy or restarting); other 4xx are final
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_sleep = time.sleep  # the back-off's clock (tests replace it)


def _retry_settings() -> tuple[int, float, float]:
    def num(name: str, default: float) -> float:
        raw = os.environ.get(name, "").strip()
        try:
            return float(raw) if raw else default
        except ValueError:
            raise HubError(f"{name}={raw!r}: expected a number") from None

    tries = max(1, int(num("HF_SAFETY_MERGE_HUB_TRIES", HUB_TRIES)))
    return tries, max(0.0, num("HF_SAFETY_MERGE_HUB_BACKOFF", HUB_BACKOFF_S)), max(0.0, num("HF_SAFETY_MERGE_HUB_MAX_WAIT", HUB_MAX_WAIT_S))


@functools.cache
def _retryable_transport_errors() -> tuple[type[BaseException], ...]:
    """Connection refused or dropped, timeouts, a response cut short: the HTTP client's transient
    errors (`httpx2` in recent huggingface_hub releases, `httpx` before), and the OS's."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, _Transient]
    for mod in ("httpx2", "httpx"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        for name in ("TimeoutException", "NetworkError", "RemoteProtocolError"):
            err = getattr(m, name, None)
            if isinstance(err, type) and issubclass(err, BaseException):
                errors.append(err)
    return tuple(errors)


def _retry_after(headers: Any) -> float | None:
    """Seconds from a `Retry-After` header (a number or an HTTP date), or None."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _transient(e: BaseException) -> tuple[str, float | None] | None:
    """(the cause in words, the Retry-After in seconds) when `e` is worth another try, else None.

    Follows `raise ... from` chains: huggingface_hub wraps a failed metadata request of a download
    in `LocalEntryNotFoundError`."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    err: BaseException | None = e
    for _ in range(8):
        if err is None or isinstance(err, OfflineModeIsEnabled | SafetyMergeError):
            return None  # offline, or this library's own verdict
        if isinstance(err, _Corrupt):
            return str(err), None
        if isinstance(err, HfHubHTTPError) and getattr(err, "response", None) is not None:
            r = err.response
            if r.status_code not in RETRY_STATUS:
                return None  # a definite answer: 401, 403, 404, 412...
            reason = getattr(r, "reason_phrase", "") or ""
            return f"HTTP {r.status_code} {reason}".strip(), _retry_after(r.headers)
        if isinstance(err, _retryable_transport_errors()):
            return f"{type(err).__name__}: {_first_line(err)}", None
        err = err.__cause__
    return None


def _with_retries(display: str, doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `fn` up to HUB_TRIES times while it fails transiently (`_transient`): exponential
    back-off with jitter, or the server's `Retry-After` (at most HUB_MAX_WAIT_S). Then one
    `HubError` line: "{display}: {doing} failed after N tries: {cause}". Other errors pass through.

    A file whose hash does not match is downloaded again; twice the same wrong hash means the Hub
    serves those bytes, and trying more would not help."""
    tries, base, max_wait = _retry_settings()
    last_corrupt: _Corrupt | None = None
    for attempt in range(1, tries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            found = _transient(e)
            if found is None:
                raise
            cause, retry_after = found
            corrupt = e if isinstance(e, _Corrupt) else None
            if corrupt is not None:
                cause = f"{corrupt}; the corrupt copy was removed from the cache"
            if corrupt is not None and last_corrupt is not None and corrupt.actual == last_corrupt.actual:
                raise HubError(_redact(f"{display}: {doing} failed: {cause} (the same bytes twice: the file on the Hub "
                                       f"itself may be damaged)")) from e
            last_corrupt = corrupt or last_corrupt
            if attempt == tries:
                n = f"{tries} {'try' if tries == 1 else 'tries'}"
                if corrupt is None and cause.startswith(("ConnectError", "ConnectTimeout", "ConnectionRefusedError")):  # no server
                    raise HubError(_redact(
                        f"{display}: cannot reach the Hub at {_endpoint()}: {doing} failed after {n} ({cause}); offline? "
                        f"Set HF_HUB_OFFLINE=1 to read from the local cache{_as_local_too(display)}"
                    )) from e
                raise HubError(_redact(f"{display}: {doing} failed after {n}: {cause}")) from e
            if retry_after is not None and retry_after > max_wait:
                raise HubError(_redact(
                    f"{display}: {doing} failed: {cause}, and the Hub asks to wait {retry_after:.0f} s (Retry-After), "
                    f"more than the {max_wait:g} s this library waits (HF_SAFETY_MERGE_HUB_MAX_WAIT); try again later"
                )) from e
            delay = retry_after if retry_after is not None else min(max_wait, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logger.warning("%s", _redact(f"{display}: {doing} failed ({cause}); try {attempt + 1} of {tries} in {delay:.1f} s"))
            _sleep(delay)
    raise AssertionError("unreachable")


def _hub_call(display: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a huggingface_hub call, retried on transient failures (`_with_retries`); every failure
    becomes one readable library error that names the repo, the endpoint and the likely cause
    (never a token)."""
    return _hub_call_doing(display, what, f"Hub request for {what} on {_endpoint()}", fn, *args, **kwargs)


def _hub_call_doing(display: str, what: str, doing: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`_hub_call` with the words for the retry messages ("download of X from ENDPOINT")."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    network_errors: tuple[type[BaseException], ...] = (*_transport_errors(), OSError)
    try:
        return _with_retries(display, doing, fn, *args, **kwargs)
    except HubError:
        raise
    except GatedRepoError as e:
        raise CheckpointError(f"{display}: gated repo on {_endpoint()}; accept its terms on the Hub and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{display}: no such Hub repo on {_endpoint()} (wrong id, or private: set HF_TOKEN){_as_local_too(display)}"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{display}: revision not found on the Hub ({_endpoint()})") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise CheckpointError(
            f"{display}: {what} is not in the local HF cache and the Hub ({_endpoint()}) cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1 with nothing cached){_as_local_too(display)}"
        ) from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"{display}: {what} not found in the repo") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        cause = {401: "no or invalid token: set HF_TOKEN or run `hf auth login`",
                 403: "the token has no write access to this repo"}.get(status or 0, "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(_redact(f"{display}: Hub request for {what} failed on {_endpoint()}"
                               f"{' (' + cause + ')' if cause else ''}: {first}")) from e
    except network_errors as e:
        raise HubError(_redact(
            f"{display}: cannot reach the Hub at {_endpoint()} for {what} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no answer'}); offline? "
            f"Set HF_HUB_OFFLINE=1 to read from the local cache{_as_local_too(display)}"
        )) from e


@functools.cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client errors huggingface_hub lets through (it uses `httpx2` in recent
    releases, `httpx` before); neither is an `OSError`."""
    import importlib

    errors: list[type[BaseException]] = []
    for mod in ("httpx2", "httpx", "requests"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        err = getattr(m, "HTTPError", None) or getattr(getattr(m, "exceptions", None), "RequestException", None)
        if isinstance(err, type) and issubclass(err, BaseException):
            errors.append(err)
    return tuple(errors)
