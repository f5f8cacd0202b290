"""Hub references: telling repo ids from local paths, resolving a reference to a local folder
(`resolve_checkpoint`) or a revision to a commit (`resolve_commit`).

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ...errors import CheckpointError
from .download import _verify_new_files
from .errors import _endpoint, _offline
from .retry import _hub_call, _hub_call_doing

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


def is_repo_id(ref: str) -> bool:
    return bool(_REPO_ID.match(ref)) and not Path(ref).exists() and not ref.startswith((".", "/", "~"))


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
