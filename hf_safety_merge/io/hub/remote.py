"""Header-first remote checkpoints: `HubCheckpoint` reads shard headers with range requests and
downloads a shard only when a tensor in it is first needed; `open_remote` / `open_checkpoint`
open any reference (local path or repo id) as a tensor source.

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ...errors import CheckpointError
from ..checkpoints import PickleCheckpoint, SafetensorsCheckpoint, TensorMeta, TensorSource
from ..safetensors_stream import read_safetensors_header
from ..tensor_info import DTYPE_TAGS, TensorInfo, dtype_size
from ..tensor_reader import TensorReader
from .download import _expected_hashes, download_file
from .errors import _endpoint, _offline, _Transient
from .resolve import AUX_PATTERNS, _local_path, resolve_checkpoint
from .retry import _hub_call, _hub_call_doing


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
