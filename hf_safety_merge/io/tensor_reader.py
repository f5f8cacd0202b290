"""Reading tensors out of safetensors files by their `TensorInfo`: positional reads into fresh
buffers, or private copy-on-write memory maps of one tensor's bytes for tensors that are only
read (the safety vector, the reference)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError

if TYPE_CHECKING:
    from .tensor_info import TensorInfo


class _PrivateMap:
    """A private, copy-on-write memory map of part of a file (`mmap(MAP_PRIVATE)` through libc,
    so no file descriptor is duplicated per mapping, unlike Python's `mmap.mmap`); unmapped when
    the last tensor viewing it is freed."""

    _libc: Any = None
    failed = False

    @classmethod
    def libc(cls) -> Any:
        if cls._libc is None:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int64]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            cls._libc = libc
        return cls._libc

    @classmethod
    def tensor(cls, fd: int, start: int, nbytes: int) -> torch.Tensor | None:
        """A uint8 tensor over bytes [start, start + nbytes) of the file, or None where mapping
        is not possible here (then the caller reads)."""
        if cls.failed or nbytes == 0:
            return None
        import ctypes
        import mmap
        import weakref

        try:
            libc = cls.libc()
            base = start - start % mmap.ALLOCATIONGRANULARITY
            length = start + nbytes - base
            addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, base)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
        except (OSError, AttributeError, TypeError, ValueError):  # no libc mmap here (e.g. Windows)
            cls.failed = True
            return None
        # read the whole range ahead (the pages are read in the background, as `pread` would)
        libc.madvise(addr, length, getattr(mmap, "MADV_WILLNEED", 3))
        buf = (ctypes.c_ubyte * length).from_address(addr)
        weakref.finalize(buf, libc.munmap, addr, length)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=start - base)


class TensorReader:
    """Reads tensors by `TensorInfo` with positional reads into new buffers, keeping one fd per
    file open; `read(..., mapped=True)` gives a private (copy-on-write) memory map of the bytes
    instead, as safetensors' own loader does: no copy and no fresh pages for a tensor that is
    only read, and a write never touches the file. Thread-safe."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = os.open(file, os.O_RDONLY)
                    self._fds[file] = fd
        return fd

    def read(self, info: TensorInfo, mapped: bool = False) -> torch.Tensor:
        """The tensor's values in a new buffer; with `mapped`, a private memory map of the file
        where possible (for tensors that are only read: no copy; a write to a page copies it)."""
        if info.nbytes and mapped:
            fd = self._fd(info.file)
            # a file cut short after its header was checked: an error here, not a SIGBUS on access
            if os.fstat(fd).st_size < info.start + info.nbytes:
                raise CheckpointError(f"{info.file}: unexpected end of file while reading tensor {info.name!r}.")
            mm = _PrivateMap.tensor(fd, info.start, info.nbytes)
            if mm is not None:
                return mm.view(info.torch_dtype).reshape(info.shape)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            fd = self._fd(info.file)
            view = buf.numpy().data
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [view[done:]], info.start + done)
                if got <= 0:
                    raise CheckpointError(
                        f"{info.file}: unexpected end of file while reading tensor {info.name!r}."
                    )
                done += got
        return buf.view(info.torch_dtype).reshape(info.shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
