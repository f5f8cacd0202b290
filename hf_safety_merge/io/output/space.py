"""Disk space: refusing a write the file system cannot hold (`check_free_space`), and telling a
full disk or quota (`is_disk_full`) as one `DiskSpaceError` line (`disk_full_error`).

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ...errors import DiskSpaceError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


#: bytes kept free beyond what a write needs (file system metadata, the card, logs)
FREE_SPACE_MARGIN = 16 * 2**20


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_free_space(folder: str | os.PathLike[str], needed_bytes: int, what: str = "output") -> None:
    """Refuse, before anything is written, a write of `needed_bytes` into `folder` (or, when it
    does not exist yet, its first existing parent) that the file system cannot hold: one line
    naming the folder, the bytes needed and the bytes free (`DiskSpaceError`). A margin of
    `FREE_SPACE_MARGIN` is kept for metadata and small files."""
    p = Path(folder).expanduser()
    probe = p
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes + FREE_SPACE_MARGIN > free:
        raise DiskSpaceError(
            f"{what} {p}: needs {_fmt_bytes(needed_bytes)} ({needed_bytes:,} bytes) but {probe} has only "
            f"{_fmt_bytes(free)} ({free:,} bytes) free; free some space or choose another folder"
        )


_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "storagefull")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk or quota is full:
    `OSError` ENOSPC / EDQUOT, or the same in the text of a wrapped error (safetensors' Rust
    writer raises its own type)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if not isinstance(e, OSError) and any(t in str(e).lower() for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(folder: str | os.PathLike[str], exc: BaseException, what: str = "output folder") -> DiskSpaceError:
    """The one-line `DiskSpaceError` for a write into `folder` that filled the disk."""
    p = Path(folder).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{_fmt_bytes(shutil.disk_usage(probe).free)} free now"
    except OSError:
        free = "free space unknown"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "No space left on device"
    return DiskSpaceError(
        f"{what} {p}: the disk filled while writing ({reason}; {free}); the partial output was removed and "
        f"{p} was left as it was; free some space or choose another folder"
    )
