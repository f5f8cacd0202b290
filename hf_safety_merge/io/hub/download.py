"""Verified, resumable Hub downloads into the HF cache: files checked against the Hub's sha256
(LFS) or git oid, partial files resumed with Range requests (`download_file`).

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import HubError, _Corrupt, _endpoint, _Transient
from .retry import _hub_call_doing


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
