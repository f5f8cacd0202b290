"""Hub integration: resolve references (local paths or repo ids), read remote checkpoints
header-first, and push folders as one atomic commit (or a pull request).

Remote checkpoints are validated from their safetensors headers, fetched with HTTP range
requests, before any weight is downloaded; shards are then downloaded one by one, only when a
tensor in them is first needed, into the regular HF cache. `HF_HUB_OFFLINE=1` works from the
cache. Tokens come from the usual places (`HF_TOKEN`, `hf auth login`) and never appear in
errors, logs or cards.

Faults: every Hub call is retried a bounded number of times on transient failures (HTTP 408,
429, 5xx, dropped or refused connections, timeouts) with exponential back-off and jitter,
honouring `Retry-After`; a 4xx answer is final. Downloads resume a partial file with a Range
request and are checked against the Hub's sha256 (LFS files) or git oid (other files). After the
last try, one line names the repo, the endpoint and the cause (docs/hub.md, "Faults").
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import struct
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..errors import CheckpointError, SafetyMergeError
from .checkpoints import PickleCheckpoint, SafetensorsCheckpoint, TensorMeta, TensorSource
from .safetensors_stream import (
    DTYPE_TAGS,
    TensorInfo,
    dtype_size,
    read_safetensors_header,
)
from .tensor_reader import TensorReader

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
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

#: files beside the weights that a loadable model folder needs
AUX_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
]


class HubError(SafetyMergeError, RuntimeError):
    """A Hub request failed (with what to retry)."""


class _Corrupt(Exception):
    """A downloaded file's hash differs from the one the Hub records (the copy was removed)."""

    def __init__(self, filename: str, algorithm: str, expected: str, actual: str) -> None:
        super().__init__(f"{filename} does not match the Hub's {algorithm} (expected {expected}, got {actual})")
        self.filename, self.algorithm, self.expected, self.actual = filename, algorithm, expected, actual


class _Transient(Exception):
    """A failure worth another try that is not an HTTP status: a response cut short, a branch
    that moved under a commit."""


def is_repo_id(ref: str) -> bool:
    return bool(_REPO_ID.match(ref)) and not Path(ref).exists() and not ref.startswith((".", "/", "~"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _redact(msg: str) -> str:
    """Remove anything that looks like a token from a message."""
    from huggingface_hub import get_token

    tok = get_token()
    if tok:
        msg = msg.replace(tok, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", msg)


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _as_local_too(display: str) -> str:
    """For a Hub failure on a name that could also be a mistyped local path: say both readings."""
    ref = display.split("@", 1)[0]
    if "/" in ref and not ref.startswith(("/", ".", "~")):
        return f" ({ref} is not a local path either: no such folder {Path(ref).resolve()})"
    return ""


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no answer"


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


def check_push_target(repo_id: str, *, token: str | None = None) -> None:
    """Before a long merge: can `repo_id` be pushed to? (a token, and the Hub answers).

    The repo need not exist (a push creates it). Raises `HubError` in one line otherwise.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import RepositoryNotFoundError

    if not is_repo_id(repo_id) or "/" not in repo_id:
        raise HubError(f"push_to_hub {repo_id!r}: expected a Hub repo id like 'user/model-name'")
    if _offline():
        raise HubError(f"push to {repo_id}: HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset it or drop push_to_hub")
    if not (token or get_token()):
        raise HubError(f"push to {repo_id}: no Hub token; set HF_TOKEN or run `hf auth login` (nothing was merged yet)")
    api = HfApi(token=token)

    def probe() -> None:
        with contextlib.suppress(RepositoryNotFoundError):  # the push creates it
            api.repo_info(repo_id)

    _hub_call(repo_id, "a push check", probe)


# ------------------------------------------------------------------------------- downloads
def _expected_hashes(info: Any) -> dict[str, tuple[str, str]]:
    """{path: (algorithm, hex)} from a `model_info(files_metadata=True)`: an LFS file's sha256, or
    the git oid (sha1 of "blob <size>\\0" + content) of a regular file, as the Hub records them."""
    out: dict[str, tuple[str, str]] = {}
    for s in getattr(info, "siblings", None) or []:
        lfs = getattr(s, "lfs", None)
        sha = getattr(lfs, "sha256", None) if lfs is not None else None
        if sha:
            out[s.rfilename] = ("sha256", str(sha).lower())
        elif getattr(s, "blob_id", None):
            out[s.rfilename] = ("git-sha1", str(s.blob_id).lower())
    return out


def _new_hasher(algorithm: str, size: int | None) -> Any:
    if algorithm == "git-sha1":
        if size is None:
            return None
        h = hashlib.sha1()  # git's object id, not a security measure
        h.update(b"blob %d\0" % size)
        return h
    return hashlib.sha256()


def _file_hash(path: Path, algorithm: str) -> str:
    h = _new_hasher(algorithm, path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return str(h.hexdigest())


def _check_file(path: Path, filename: str, expected: tuple[str, str] | None) -> None:
    """Raise `_Corrupt` when `path` does not hash to what the Hub records for `filename`."""
    if expected is None:
        return
    actual = _file_hash(path, expected[0])
    if actual != expected[1]:
        raise _Corrupt(filename, expected[0], expected[1], actual)


def _xet_download() -> bool:
    """Whether huggingface_hub downloads Xet-stored files through `hf_xet` (installed, not disabled)."""
    import importlib.util

    from huggingface_hub import constants

    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


def _remove_cached(pointer: Path) -> None:
    """Remove a file from the HF cache: its blob and its snapshot entry."""
    with contextlib.suppress(OSError):
        pointer.resolve().unlink()
    with contextlib.suppress(OSError):
        pointer.unlink()


def _verify_new_files(repo_id: str, snapshot: Path, blobs_before: set[str], token: str | bool | None = None) -> None:
    """Check the files a snapshot download just added (their blobs are new) against the Hub's
    hashes at that commit; remove a corrupt one and raise `_Corrupt` (so the retry fetches it again)."""
    from huggingface_hub import HfApi

    new = [p for p in sorted(snapshot.rglob("*")) if p.is_symlink() and p.resolve().name not in blobs_before]
    if not new:
        return
    expected = _expected_hashes(HfApi(token=token).model_info(repo_id, revision=snapshot.name, files_metadata=True))
    for p in new:
        name = p.relative_to(snapshot).as_posix()
        try:
            _check_file(p, name, expected.get(name))
        except _Corrupt:
            _remove_cached(p)
            raise


def _link_into_snapshot(blob: Path, pointer: Path) -> None:
    """Point `snapshots/<commit>/<file>` at its blob, like huggingface_hub does (a relative
    symlink; a copy where the file system has no symlinks)."""
    from huggingface_hub.file_download import are_symlinks_supported

    pointer.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        pointer.unlink()
    if are_symlinks_supported(str(blob.parent.parent)):
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    else:
        tmp = pointer.with_name(pointer.name + ".tmp")
        shutil.copyfile(blob, tmp)
        os.replace(tmp, pointer)


class _Partial:
    """A resumable download: `<blob>.incomplete` in the HF cache and the hash of what it holds."""

    def __init__(self, path: Path, expected: tuple[str, str] | None, size: int | None) -> None:
        self.path, self.expected, self.size = path, expected, size
        self.hasher: Any = None
        self.offset = -1  # bytes the hasher has seen; -1: not yet in step with the file

    def _sync(self) -> int:
        have = self.path.stat().st_size if self.path.exists() else 0
        if self.size is not None and have > self.size:
            self.path.unlink()
            have = 0
        if self.offset != have:  # a partial file from an earlier run: hash what it holds
            self.hasher = _new_hasher(self.expected[0], self.size) if self.expected else None
            if have and self.hasher is not None:
                with open(self.path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        self.hasher.update(chunk)
            self.offset = have
        return have

    def fetch(self, url: str, headers: dict[str, str], filename: str) -> None:
        """One try: GET what is missing (a Range request when part of the file is here), append
        it; raise `_Transient` if the file is still short and `_Corrupt` (after removing it) if
        it is complete but its hash is not the Hub's."""
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session, hf_raise_for_status

        have = self._sync()
        if self.size is None or have < self.size:
            req = {**headers, "Accept-Encoding": "identity"}
            if have:
                req["Range"] = f"bytes={have}-"
            with get_session().stream("GET", url, headers=req, follow_redirects=True,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                if have and r.status_code == 416:  # the server has nothing past `have`: start over
                    self.path.unlink()
                    self.offset = -1
                    raise _Transient(f"{filename}: the partial download does not fit the file; starting over")
                hf_raise_for_status(r)
                if have and r.status_code != 206:  # the Range was ignored: the whole file comes
                    self.path.unlink()
                    self.offset, have = -1, 0
                    self._sync()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as f:
                    for chunk in r.iter_bytes():  # as they arrive: a drop loses nothing received
                        f.write(chunk)
                        if self.hasher is not None:
                            self.hasher.update(chunk)
                        self.offset += len(chunk)
            have = self._sync()
        if self.size is not None and have < self.size:
            raise _Transient(f"{filename}: the transfer ended after {have} of {self.size} bytes")
        if self.expected is None:
            return
        actual = str(self.hasher.hexdigest()) if self.hasher is not None else _file_hash(self.path, self.expected[0])
        if actual != self.expected[1]:
            self.path.unlink()
            self.offset = -1
            raise _Corrupt(filename, self.expected[0], self.expected[1], actual)


def download_file(repo_id: str, filename: str, *, commit: str, token: str | bool | None = None,
                  expected: tuple[str, str] | None = None, size: int | None = None,
                  display: str | None = None) -> str:
    """Download one file of `repo_id` at `commit` into the HF cache (or find it there); return its
    path in the cache's snapshot folder.

    Over plain HTTP the library downloads itself: a partial file (`blobs/<etag>.incomplete`) is
    resumed with a Range request on the next try, or by the next run. Xet-stored files, when
    `hf_xet` is installed, go through `hf_hub_download` (which resumes Xet chunks itself). Either
    way the finished file is checked against `expected` (`("sha256" | "git-sha1", hex)`, from
    `model_info(files_metadata=True)`) before it is used: a mismatch removes it and downloads it
    again. Transient failures are retried (`_with_retries`); the last one raises `HubError` in one
    line naming the repo, the file, the endpoint and the cause.
    """
    from huggingface_hub import (
        constants,
        get_hf_file_metadata,
        hf_hub_download,
        hf_hub_url,
        try_to_load_from_cache,
    )
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    display = display or repo_id
    cached = try_to_load_from_cache(repo_id, filename, revision=commit)
    if isinstance(cached, str):
        return cached
    endpoint = _endpoint()
    url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
    cache = Path(constants.HF_HUB_CACHE)
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    partials: dict[str, _Partial] = {}

    def attempt() -> str:
        meta = get_hf_file_metadata(url, token=token)  # one HEAD: etag (the blob's name), size, location
        if meta.xet_file_data is not None and _xet_download():
            path = Path(hf_hub_download(repo_id, filename, revision=commit, token=token))
            try:
                _check_file(path, filename, expected)
            except _Corrupt:
                _remove_cached(path)
                raise
            return str(path)
        etag = meta.etag or (expected[1] if expected else None)
        if not etag:
            raise HubError(f"{display}: the Hub ({endpoint}) gives no ETag for {filename}; cannot place it in the cache")
        blob = storage / "blobs" / etag
        pointer = storage / "snapshots" / commit / filename
        lock = cache / ".locks" / repo_folder_name(repo_id=repo_id, repo_type="model") / f"{etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(str(lock)):  # the lock huggingface_hub takes for the same blob
            if not blob.exists():
                partial = partials.setdefault(etag, _Partial(blob.with_name(f"{etag}.incomplete"), expected,
                                                             meta.size if meta.size is not None else size))
                headers = build_hf_headers(token=token)
                location = meta.location or url
                if urlparse(location).netloc != urlparse(url).netloc:
                    headers.pop("authorization", None)  # a CDN: the token stays with the Hub
                partial.fetch(location, headers, filename)
                os.replace(partial.path, blob)
            _link_into_snapshot(blob, pointer)
        return str(pointer)

    return str(_hub_call_doing(display, filename, f"download of {filename} from {endpoint}", attempt))


class HubCheckpoint(TensorSource):
    """A safetensors checkpoint in a Hub repo, pinned to one commit, seen header-first.

    `keys()`/`meta()` come from the shard headers (range requests); `get()` downloads the shard
    holding the tensor on first use (into the HF cache, checked against the Hub's sha256) and
    reads the tensor from disk.
    """

    mapped_views = True  # the downloaded files are local safetensors

    def __init__(self, repo_id: str, revision: str | None = None, prefix: str = "model",
                 token: str | bool | None = None, aux_files: list[str] | None = None) -> None:
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.display = f"{repo_id}@{revision}" if revision else repo_id
        self.api = HfApi(token=token)
        info = _hub_call(self.display, "repo info", self.api.model_info, repo_id, revision=revision, files_metadata=True)
        self.commit: str = info.sha
        files = [s.rfilename for s in (info.siblings or [])]
        self._expected = _expected_hashes(info)
        self._sizes = {s.rfilename: s.size for s in (info.siblings or []) if getattr(s, "size", None) is not None}
        self.remote_files = files
        index_name = f"{prefix}.safetensors.index.json"
        self._weight_files: list[str]
        if index_name in files:
            idx_path = self._download(index_name)
            try:
                wm = json.loads(Path(idx_path).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.display}: {index_name} is not a valid index ({e})") from e
            self._weight_files = sorted(set(wm.values()))
            missing = [f for f in self._weight_files if f not in files]
            if missing:
                raise CheckpointError(f"{self.display}: {index_name} names shard(s) missing from the repo: {missing}")
        elif f"{prefix}.safetensors" in files:
            self._weight_files = [f"{prefix}.safetensors"]
        else:
            bins = [f for f in files if f.endswith(".bin")]
            hint = (" It holds only pickle checkpoints (" + ", ".join(bins) + "), which are not read: unpickling can run code.") if bins else ""
            raise CheckpointError(f"{self.display}: no {prefix}.safetensors weights in the repo.{hint}")
        # aux files first (small): config for architecture checks, tokenizer for the output
        local_dir: Path | None = None
        for name in aux_files if aux_files is not None else AUX_PATTERNS:
            if name in files:
                local_dir = Path(self._download(name)).parent
        self._metas: dict[str, tuple[str, TensorMeta]] = {}
        for f in self._weight_files:
            for name, meta in self._remote_header(f).items():
                if name in self._metas:
                    raise CheckpointError(f"{self.display}: tensor {name!r} appears in two shards")
                self._metas[name] = (f, meta)
        self.path = local_dir
        self._local: dict[str, dict[str, TensorInfo]] = {}
        self._reader = TensorReader()

    def _download(self, filename: str) -> str:
        """The file's path in the HF cache, downloaded (resumably, verified) if needed."""
        return download_file(self.repo_id, filename, commit=self.commit, token=self.api.token,
                             expected=self._expected.get(filename), size=self._sizes.get(filename), display=self.display)

    def _remote_header(self, filename: str) -> dict[str, TensorMeta]:
        """Read one shard's header with two HTTP range requests (no weight bytes).

        A byte range cannot be checked against the file's sha256; the header is checked again,
        field by field, in the downloaded and verified file before any tensor is read from it."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=self.api.endpoint)
        headers = build_hf_headers(token=self.api.token)

        def fetch(start: int, end: int) -> tuple[bytes, int | None]:
            r = get_session().get(url, headers={**headers, "range": f"bytes={start}-{end}", "Accept-Encoding": "identity"},
                                  follow_redirects=True)
            hf_raise_for_status(r)
            total = None
            cr = r.headers.get("content-range")
            if cr and "/" in cr:
                try:
                    total = int(cr.rsplit("/", 1)[1])
                except ValueError:
                    total = None
            body = r.content
            if r.status_code == 200:  # the Range was ignored: the whole file came
                total = len(body)
                body = body[start : end + 1]
            want = end - start + 1 if total is None else max(0, min(end + 1, total) - start)
            if len(body) < want:
                raise _Transient(f"{filename}: {len(body)} of {want} header bytes arrived")
            return body, total

        doing = f"header read of {filename} from {_endpoint()}"
        first, total = _hub_call_doing(self.display, filename, doing, fetch, 0, 7)
        if len(first) < 8:
            raise CheckpointError(f"{self.display}/{filename}: too small to be a safetensors file")
        (n,) = struct.unpack("<Q", first[:8])
        if n > 100 * 2**20 or (total is not None and 8 + n > total):
            raise CheckpointError(f"{self.display}/{filename}: header length {n} does not fit; truncated or not safetensors")
        raw, _ = _hub_call_doing(self.display, filename, doing, fetch, 8, 8 + n - 1)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.display}/{filename}: safetensors header is not valid JSON ({e})") from e
        header.pop("__metadata__", None)
        out: dict[str, TensorMeta] = {}
        for name, entry in header.items():
            tag = entry.get("dtype")
            if tag not in DTYPE_TAGS:
                raise CheckpointError(f"{self.display}/{filename}: tensor {name!r} has unsupported dtype {tag!r}")
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != TensorMeta(shape, tag).numel * dtype_size(tag):
                raise CheckpointError(f"{self.display}/{filename}: corrupted header entry for {name!r}")
            if total is not None and 8 + n + end > total:
                raise CheckpointError(f"{self.display}/{filename}: tensor {name!r} ends past the end of the file (truncated upload?)")
            out[name] = TensorMeta(shape, tag)
        return out

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> TensorMeta:
        return self._metas[name][1]

    def where(self, name: str) -> str:
        f = self._metas.get(name)
        return f"{self.display}/{f[0]}" if f else self.display

    def __contains__(self, name: object) -> bool:
        return name in self._metas

    def file_of(self, name: str) -> str:
        return self._metas[name][0]

    def _info(self, name: str) -> TensorInfo:
        fname = self._metas[name][0]
        infos = self._local.get(fname)
        if infos is None:
            local = Path(self._download(fname))
            infos, _ = read_safetensors_header(local)
            for n, (f, meta) in self._metas.items():  # the plan used the remote header: same file?
                got = infos.get(n) if f == fname else None
                if f == fname and (got is None or (tuple(got.shape), got.dtype) != (tuple(meta.shape), meta.dtype)):
                    raise CheckpointError(f"{self.display}/{fname}: the downloaded file's header differs from the one "
                                          f"read before the download (tensor {n!r}); the repo changed or a transfer was corrupted")
            self._local[fname] = infos
        if name not in infos:
            raise CheckpointError(f"{self.display}/{fname}: downloaded file has no tensor {name!r}")
        return infos[name]

    def get(self, name: str) -> torch.Tensor:
        return self._reader.read(self._info(name))

    def view(self, name: str) -> torch.Tensor:
        return self._reader.read(self._info(name), mapped=True)

    def close(self) -> None:
        self._reader.close()


def _local_path(ref: str) -> Path | None:
    """`ref` as an existing local path, or None when it is a Hub repo id (neither: `CheckpointError`)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if not is_repo_id(ref):
        raise CheckpointError(f"{ref}: no such file or folder (and not a valid Hub repo id)")
    return None


def resolve_checkpoint(
    ref: str,
    *,
    revision: str | None = None,
    prefix: str = "model",
    allow_pickle: bool = False,
    extra_patterns: list[str] | None = None,
) -> tuple[Path, str]:
    """Return (local folder or file, display name) for a local path or a Hub repo id.

    Hub repos are fetched with `huggingface_hub.snapshot_download`, restricted to the weight
    files, config and tokenizer; the HF cache and `HF_HUB_OFFLINE=1` are honoured. Prefer
    `open_remote` for weights, which validates headers before downloading.
    """
    p = _local_path(ref)
    if p is not None:
        return p, str(p)
    from huggingface_hub import snapshot_download

    patterns = [f"{prefix}*.safetensors", f"{prefix}*.safetensors.index.json", "*.json", *AUX_PATTERNS]
    if allow_pickle:
        patterns.append("*.bin")
    patterns += extra_patterns or []
    display = f"{ref}@{revision}" if revision else ref
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref, repo_type="model") / "blobs"
    before = {p.name for p in blobs.iterdir()} if blobs.is_dir() else set()

    def attempt() -> str:
        local = snapshot_download(ref, revision=revision, allow_patterns=patterns)
        if not _offline():  # what this call downloaded is checked against the Hub's hashes
            _verify_new_files(ref, Path(local), before)
        return str(local)

    local = _hub_call_doing(display, "files", f"download of its files from {_endpoint()}", attempt)
    return Path(local), display


def resolve_commit(
    ref: str | os.PathLike[str], *, revision: str | None = None, token: str | bool | None = None
) -> str | None:
    """The commit a Hub repo id's `revision` (default: the default branch) resolves to now, or
    None when `ref` is a local path.

    One metadata request, no file download (`HfApi.resolve_revision`); a commit hash resolves to
    itself without a request. Offline (`HF_HUB_OFFLINE=1`), or when the Hub cannot be reached,
    the commit the local HF cache records for that revision (its `refs/` folder) is used.
    Failures (unknown repo or revision, nothing cached offline) raise `CheckpointError` or
    `HubError` in one line.
    """
    ref = str(ref)
    if _local_path(ref) is not None:
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionResolutionError

    display = f"{ref}@{revision}" if revision else ref
    try:
        resolved = _hub_call(display, "the commit of its revision", HfApi(token=token).resolve_revision, ref,
                             revision=revision, local_files_only=_offline())
    except RevisionResolutionError as e:  # offline or unreachable, and no refs/ entry in the cache
        raise CheckpointError(
            f"{display}: cannot resolve its revision to a commit: the Hub ({_endpoint()}) cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1) and the local HF cache records no commit for it"
        ) from e
    return str(resolved.resolved)


def open_remote(
    ref: str,
    *,
    revision: str | None = None,
    prefix: str = "model",
    allow_pickle: bool = False,
    aux_files: list[str] | None = None,
) -> TensorSource | None:
    """A header-first `HubCheckpoint` for a repo id, or None when `ref` is a local path.

    Offline (`HF_HUB_OFFLINE=1`), the repo is read from the local HF cache instead.
    """
    if _local_path(ref) is not None:
        return None
    if _offline() or allow_pickle:
        return None  # resolve from the cache / full snapshot
    return HubCheckpoint(ref, revision=revision, prefix=prefix, aux_files=aux_files)


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    prefix: str = "model",
    allow_pickle: bool = False,
    revision: str | None = None,
) -> TensorSource:
    """Open a local checkpoint folder/file or a Hub repo id as a streaming tensor source."""
    remote = open_remote(str(path), revision=revision, prefix=prefix, allow_pickle=allow_pickle)
    if remote is not None:
        return remote
    local, display = resolve_checkpoint(str(path), revision=revision, prefix=prefix, allow_pickle=allow_pickle)
    if local.is_dir() and allow_pickle and not any(local.glob("*.safetensors")) and any(local.glob("*.bin")):
        return PickleCheckpoint(local, display)
    return SafetensorsCheckpoint.open(local, prefix=prefix, display=display)


# ------------------------------------------------------------------------------------ push
def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    path_in_repo: str | None = None,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
) -> Any:
    """Push every file of `folder` to `repo_id` as ONE commit (or a pull request), with the
    arguments of `hf upload REPO_ID FOLDER`.

    File contents are uploaded first (`HfApi.preupload_lfs_files`, each request retried by
    huggingface_hub), then committed in a single `HfApi.create_commit`, retried here on transient
    failures and never made twice (`_commit_once`): if an upload or the commit fails, nothing is
    committed and the repo's branch is unchanged; re-running uploads only what the Hub does not
    have yet. (`HfApi.upload_folder` is not used: with `hf_xet` installed it may split a large
    folder into several commits.) `include` / `exclude` are glob patterns (`allow_patterns` /
    `ignore_patterns`); `.cache` and `.git` folders are never pushed. Returns the `CommitInfo`
    (with `pr_url` for PRs).
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    if not files:
        raise CheckpointError(f"{folder}: nothing to push (empty folder)")
    check_push_target(repo_id, token=token)
    api = HfApi(token=token)
    _hub_call(repo_id, "create repo", api.create_repo, repo_id, private=private, exist_ok=True)
    message = commit_message or f"Upload safety-patched model with hf-safety-merge ({len(files)} files)"
    ignore = [".cache/**", "**/.cache/**", ".git", ".git/*", "*/.git", "**/.git/**",
              *([exclude] if isinstance(exclude, str) else (exclude or []))]
    ops = _folder_operations(folder, files, path_in_repo, include, ignore)
    rerun = (f"Retry with `hf-safety-merge push {repo_id} {folder}`{' --create-pr' if create_pr else ''}; "
             "files already uploaded are not sent again.")
    try:  # 1. the file contents (LFS/Xet), each request retried by huggingface_hub itself
        api.preupload_lfs_files(repo_id, additions=ops, revision=revision, create_pr=create_pr, free_memory=False)
    except Exception as e:  # network drop, HTTP error: nothing was committed
        raise HubError(_redact(
            f"push of {folder} to {repo_id} on {_endpoint()} failed before the commit was made, while uploading the files "
            f"({type(e).__name__}: {_first_line(e)}; each upload request was retried by huggingface_hub). "
            f"Nothing was committed: the repo is unchanged. {rerun}"
        )) from e
    # 2. ONE commit, retried here (huggingface_hub does not retry it)
    return _commit_once(api, repo_id, ops, folder=folder, message=message, description=commit_description,
                        revision=revision, create_pr=create_pr, rerun=rerun)


def _folder_operations(folder: Path, files: list[Path], path_in_repo: str | None, include: list[str] | str | None,
                       ignore: list[str]) -> list[Any]:
    """The additions `hf upload` makes of a folder (glob patterns on paths relative to it)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.utils import filter_repo_objects

    rel = {p.relative_to(folder).as_posix(): p for p in files}
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo.strip("/") else ""
    return [CommitOperationAdd(path_in_repo=prefix + r, path_or_fileobj=str(rel[r]))
            for r in filter_repo_objects(list(rel), allow_patterns=include, ignore_patterns=ignore)]


def _commit_holds(api: Any, repo_id: str, oid: str, ops: list[Any]) -> bool:
    """Whether commit `oid` holds every file of `ops` with the same content (by the Hub's hashes)."""
    expected = _expected_hashes(api.model_info(repo_id, revision=oid, files_metadata=True))
    for op in ops:
        exp = expected.get(op.path_in_repo)
        if exp is None:
            return False
        actual = op.upload_info.sha256.hex() if exp[0] == "sha256" else _file_hash(Path(op.path_or_fileobj), "git-sha1")
        if actual != exp[1]:
            return False
    return True


def _failed_url(e: BaseException) -> str:
    """The URL of the request behind an HTTP client error, or ""."""
    for holder in (getattr(e, "response", None), e):
        try:
            req = getattr(holder, "request", None)
        except RuntimeError:  # httpx: an error raised without a request
            req = None
        if req is not None and getattr(req, "url", None) is not None:
            return str(req.url)
    return ""


def _commit_once(api: Any, repo_id: str, ops: list[Any], *, folder: Path, message: str, description: str | None,
                 revision: str | None, create_pr: bool, rerun: str) -> Any:
    """Create the commit, retried on transient failures, never twice.

    A branch commit names its parent (`parent_commit`: the branch head read just before). When a
    commit request got no answer (the connection dropped), the next try first reads the head
    again: moved, and holding exactly these files, the commit was made and is returned; not moved,
    it was not made. A moved branch (HTTP 412) is retried on the new head. For a pull request a
    lost answer cannot be told apart from a refusal, so it is not retried (one line says so)."""
    from huggingface_hub import CommitInfo
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    state: dict[str, Any] = {"parent": None, "unanswered": False, "pr_unanswered": False}

    def head() -> str | None:
        if create_pr:
            return None
        try:
            return str(api.repo_info(repo_id, revision=revision).sha)
        except RevisionNotFoundError:
            return None

    def made(parent: str | None) -> Any:
        if parent is None or not state["unanswered"] or parent == state["parent"] or not _commit_holds(api, repo_id, parent, ops):
            return None
        logger.warning("%s", f"{repo_id}: the commit whose answer was lost had been made ({parent}); not committing again")
        return CommitInfo(commit_url=f"{api.endpoint}/{repo_id}/commit/{parent}", commit_message=message,
                          commit_description=description or "", oid=parent, _endpoint=api.endpoint)

    def attempt() -> Any:
        parent = head()
        done = made(parent)
        if done is not None:
            return done
        state["parent"] = parent
        try:
            return api.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                     revision=revision, create_pr=create_pr, parent_commit=parent)
        except HfHubHTTPError as e:
            if getattr(getattr(e, "response", None), "status_code", None) == 412 and not create_pr:
                raise _Transient(f"the branch moved during the push ({_first_line(e)})") from e
            raise
        except _retryable_transport_errors() as e:
            if "/commit/" in _failed_url(e):
                if create_pr:
                    state["pr_unanswered"] = True
                    raise HubError(_redact(
                        f"{repo_id}: the pull-request commit of {folder} on {_endpoint()} got no answer ({type(e).__name__}: "
                        f"{_first_line(e)}); it may or may not have been opened: look at the repo's pull requests before "
                        f"re-running (not retried, so as not to open two)")) from e
                state["unanswered"] = True
            raise

    doing = f"commit of {len(ops)} file(s) from {folder} to {_endpoint()}"
    try:
        return _hub_call_doing(repo_id, "the commit", doing, attempt)
    except HubError as e:
        if state["unanswered"]:
            with contextlib.suppress(Exception):
                done = made(head())
                if done is not None:
                    return done
            raise HubError(f"{e}. The last commit request got no answer: look at {repo_id}'s history before re-running") from e
        if state["pr_unanswered"]:
            raise
        raise HubError(f"{e}. Nothing was committed: the repo is unchanged. {rerun}") from e
