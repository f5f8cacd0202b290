"""Streaming safetensors I/O: header-only inspection, per-tensor reads, shard-by-shard writes.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; here the header
of each output shard is computed up front from the merge plan (names, shapes, dtypes are known
before any weight is read), so tensor bytes are streamed to disk one tensor at a time and peak
memory stays at one tensor, whatever the shard size. Files written here are ordinary
safetensors files (tested against `safetensors.safe_open` and `load_file`).

Reads use positional reads into a fresh buffer (no memory map), so pages of already-merged
shards do not stay resident and peak RSS does not grow with the number of shards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .tensor_info import DTYPE_TAGS, TORCH_TO_TAG, TensorInfo, dtype_size
from .tensor_reader import (
    TensorReader as TensorReader,  # the reader lives in `io.tensor_reader`; kept importable here
)

_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file without reading any tensor data.

    Detects truncated files (a tensor that ends past the end of the file), corrupted headers,
    unknown dtypes and inconsistent sizes, naming the file and tensor.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if size < 8:
        raise CheckpointError(
            f"{path}: file is {size} bytes, too small for a safetensors file "
            "(it starts with an 8-byte header length). Truncated download?"
        )
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} does not fit in a {size}-byte file; "
                "the file is truncated or not a safetensors file."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}).") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            tag = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name!r}: {entry!r}") from e
        if tag not in DTYPE_TAGS:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {tag!r}; supported: {sorted(DTYPE_TAGS)}"
            )
        expected = math.prod(shape) * dtype_size(tag)
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                f"of {tag} needs {expected}: corrupted header."
            )
        if base + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {base + end} but the file has only {size} "
                "bytes: the file is truncated (an interrupted download or copy?)."
            )
        infos[name] = TensorInfo(name, tag, shape, path, base + begin, base + end)
    return infos, metadata


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def parse_size(size: int | str) -> int:
    """Parse '5GB', '500MB', '2GiB', '100KB' or an int (bytes); the size must be positive."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise ValueError(f"cannot parse size {size!r}; expected e.g. '5GB', '500MB' or a number of bytes")
    if isinstance(size, int):
        value = size
    else:
        s = size.strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
                 "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
        value = -1
        for unit, mult in units.items():
            if s.endswith(unit):
                try:
                    num = float(s[: -len(unit)])
                except ValueError:
                    break
                if math.isfinite(num):
                    value = int(num * mult)
                break
        else:
            try:
                value = int(s)
            except ValueError:
                value = -1
        if value == -1 and not s.lstrip("-").isdigit():
            raise ValueError(f"cannot parse size {size!r}; expected e.g. '5GB', '500MB' or a number of bytes")
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


def plan_shards(tensors: Sequence[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Greedily pack tensors, in order, into shards of at most `max_shard_size` bytes
    (a tensor larger than the limit gets a shard of its own), like transformers does."""
    shards: list[list[OutputTensor]] = [[]]
    current = 0
    for t in tensors:
        if shards[-1] and current + t.nbytes > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(t)
        current += t.nbytes
    return shards if shards[0] else []


def _header_bytes(tensors: Sequence[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def _preallocate(fh: Any, size: int) -> None:
    """Reserve a shard's final size up front (its size is known from the plan): the file system
    then allocates its blocks once instead of at every write. Best effort (not every file system
    or platform supports it); the file's size is exactly what is written either way."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None or size <= 0:
        return
    with contextlib.suppress(OSError):
        fallocate(fh.fileno(), 0, size)


class StreamingShardWriter:
    """Writes a (possibly sharded) safetensors checkpoint one tensor at a time.

    The full list of output tensors is given up front; `write` must then be called in that
    order. Files follow the transformers convention: `{prefix}.safetensors` when one shard
    suffices, else `{prefix}-00001-of-0000N.safetensors` plus `{prefix}.safetensors.index.json`.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        tensors: Sequence[OutputTensor],
        max_shard_size: int | str = "5GB",
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        self.shards = plan_shards(list(tensors), parse_size(max_shard_size))
        n = len(self.shards)
        self.files = (
            [f"{prefix}.safetensors"]
            if n <= 1
            else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order: list[tuple[int, OutputTensor]] = [
            (i, t) for i, shard in enumerate(self.shards) for t in shard
        ]
        self._pos = 0
        self._fh: Any = None
        self._fh_shard = -1
        self.total_size = sum(t.nbytes for t in tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._order):
            raise RuntimeError(f"unexpected extra tensor {name!r}")
        shard_idx, spec = self._order[self._pos]
        if name != spec.name:
            raise RuntimeError(f"tensors must be written in plan order: expected {spec.name!r}, got {name!r}")
        if tuple(tensor.shape) != spec.shape or TORCH_TO_TAG.get(tensor.dtype) != spec.dtype:
            raise RuntimeError(
                f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        if shard_idx != self._fh_shard:
            self._close_file()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.out_dir / self.files[shard_idx], "wb")  # noqa: SIM115 (kept open across writes)
            header = _header_bytes(self.shards[shard_idx], self.metadata)
            _preallocate(self._fh, len(header) + sum(t.nbytes for t in self.shards[shard_idx]))
            self._fh.write(header)
            self._fh_shard = shard_idx
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._pos += 1

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index (if sharded); return the files written."""
        self._close_file()
        if self._pos != len(self._order):
            missing = [t.name for _, t in self._order[self._pos :]][:5]
            raise RuntimeError(f"writer closed before all tensors were written; next missing: {missing}")
        if not self._order:
            # An empty checkpoint is still a valid file.
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / self.files[0], "wb") as f:
                f.write(_header_bytes([], self.metadata))
            return [self.files[0]]
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {t.name: self.files[i] for i, t in self._order},
            }
            with open(self.out_dir / f"{self.prefix}.safetensors.index.json", "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            return [*self.files, f"{self.prefix}.safetensors.index.json"]
        return list(self.files)

    def abort(self) -> None:
        """Close the open shard, never raising: after a failed write (a full disk) closing
        flushes what is buffered and fails again; the caller's error is the one that counts."""
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()


def iter_names_in_file_order(infos: Iterable[TensorInfo]) -> list[TensorInfo]:
    """Order tensors by (file, offset): sequential reads."""
    return sorted(infos, key=lambda i: (str(i.file), i.start))


class BackgroundShardWriter:
    """A `StreamingShardWriter` whose writes run on a background thread, so that writing
    tensor i overlaps computing tensor i+1 (at most `depth` tensors queued). Same interface and
    the same files; an error on the writer thread is raised by the next `write` or by `close`.
    `on_write(seconds)` is called after each write; `release(tensor)` too, once the writer no
    longer needs the tensor (a buffer pool takes it back)."""

    def __init__(self, writer: StreamingShardWriter, depth: int = 2, on_write: Any = None, release: Any = None) -> None:
        import queue
        import threading

        self.writer = writer
        self.files = writer.files
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._on_write = on_write
        self._release = release
        self._thread = threading.Thread(target=self._run, name="hf-safety-merge-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import time

        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain after a failure
            t = time.perf_counter()
            try:
                self.writer.write(*item)
            except BaseException as e:  # re-raised on the caller's thread
                self._error = e
            else:
                if self._release is not None:
                    self._release(item[1])
            if self._on_write is not None:
                self._on_write(time.perf_counter() - t)
            del item

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._raise()
        self._q.put((name, tensor))

    def _join(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def close(self) -> list[str]:
        self._join()
        self._raise()
        return self.writer.close()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._join()
        self.writer.abort()
