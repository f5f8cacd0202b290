"""Hub integration: resolve references (local paths or repo ids), read remote checkpoints
header-first, and push folders as one atomic commit (or a pull request).

Remote checkpoints are validated from their safetensors headers, fetched with HTTP range
requests, before any weight is downloaded; shards are then downloaded one by one, only when a
tensor in them is first needed, into the regular HF cache. `HF_HUB_OFFLINE=1` works from the
cache. Tokens come from the usual places (`HF_TOKEN`, `hf auth login`) and never appear in
errors, logs or cards.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

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


def _hub_call(display: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a huggingface_hub call; every failure becomes one readable library error that names
    the repo, the endpoint and the likely cause (never a token)."""
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
        return fn(*args, **kwargs)
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


class HubCheckpoint(TensorSource):
    """A safetensors checkpoint in a Hub repo, pinned to one commit, seen header-first.

    `keys()`/`meta()` come from the shard headers (range requests); `get()` downloads the shard
    holding the tensor on first use (into the HF cache) and reads the tensor from disk.
    """

    mapped_views = True  # the downloaded files are local safetensors

    def __init__(self, repo_id: str, revision: str | None = None, prefix: str = "model",
                 token: str | bool | None = None, aux_files: list[str] | None = None) -> None:
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.display = f"{repo_id}@{revision}" if revision else repo_id
        self.api = HfApi(token=token)
        info = _hub_call(self.display, "repo info", self.api.model_info, repo_id, revision=revision)
        self.commit: str = info.sha
        files = [s.rfilename for s in (info.siblings or [])]
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
        from huggingface_hub import hf_hub_download

        return str(_hub_call(self.display, filename, hf_hub_download, self.repo_id, filename,
                             revision=self.commit, token=self.api.token))

    def _remote_header(self, filename: str) -> dict[str, TensorMeta]:
        """Read one shard's header with two HTTP range requests (no weight bytes)."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=self.api.endpoint)
        headers = build_hf_headers(token=self.api.token)

        def fetch(start: int, end: int) -> tuple[bytes, int | None]:
            r = get_session().get(url, headers={**headers, "range": f"bytes={start}-{end}"}, follow_redirects=True)
            hf_raise_for_status(r)
            total = None
            cr = r.headers.get("content-range")
            if cr and "/" in cr:
                try:
                    total = int(cr.rsplit("/", 1)[1])
                except ValueError:
                    total = None
            return r.content, total

        first, total = _hub_call(self.display, filename, fetch, 0, 7)
        if len(first) < 8:
            raise CheckpointError(f"{self.display}/{filename}: too small to be a safetensors file")
        (n,) = struct.unpack("<Q", first[:8])
        if n > 100 * 2**20 or (total is not None and 8 + n > total):
            raise CheckpointError(f"{self.display}/{filename}: header length {n} does not fit; truncated or not safetensors")
        raw, _ = _hub_call(self.display, filename, fetch, 8, 8 + n - 1)
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
    local = _hub_call(display, "files", snapshot_download, ref, revision=revision, allow_patterns=patterns)
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
    """Push every file of `folder` to `repo_id` as ONE commit (or a pull request), with
    `HfApi.upload_folder` (the same call as `hf upload REPO_ID FOLDER`).

    Files are uploaded first (LFS), then committed in a single commit: if an upload fails,
    nothing is committed and the repo's branch is unchanged; re-running uploads only what the
    Hub does not have yet. `include` / `exclude` are glob patterns (`allow_patterns` /
    `ignore_patterns`); `.cache` folders are never pushed. Returns the `CommitInfo` (with
    `pr_url` for PRs).
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
    ignore = [".cache/**", "**/.cache/**", *([exclude] if isinstance(exclude, str) else (exclude or []))]
    try:
        return api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=path_in_repo,
                                 commit_message=message, commit_description=commit_description,
                                 revision=revision, create_pr=create_pr, allow_patterns=include,
                                 ignore_patterns=ignore)
    except Exception as e:  # network drop, HTTP error: nothing was committed
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no answer"
        raise HubError(
            _redact(
                f"push of {folder} to {repo_id} on {_endpoint()} failed before the commit was made ({type(e).__name__}: {first}). "
                f"Nothing was committed: the repo is unchanged. Retry with `hf-safety-merge push {repo_id} {folder}`"
                f"{' --create-pr' if create_pr else ''}; files already uploaded are not sent again."
            )
        ) from e
