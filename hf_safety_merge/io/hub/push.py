"""Atomic pushes: `push_folder` uploads a folder's files, then makes ONE commit (or a pull
request), retried on transient failures and never made twice; `check_push_target` checks a
push can work before a long merge.

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from .download import _expected_hashes, _file_hash
from .errors import HubError, _endpoint, _first_line, _offline, _redact, _Transient
from .resolve import is_repo_id
from .retry import _hub_call, _hub_call_doing, _retryable_transport_errors

logger = logging.getLogger("hf_safety_merge")


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
