"""One writer per output folder: `OutputLock`, an `flock` on `.NAME.lock` beside the output that
the kernel drops when its process ends.

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

from ...errors import OutputBusyError
from .space import disk_full_error, is_disk_full
from .stale import remove_stale_temporaries


class OutputLock:
    """`with OutputLock(out): ...` holds an exclusive `flock` on `.NAME.lock` beside `out` (the
    file holds the holder's pid). A second writer fails at once with `OutputBusyError`, naming
    the folder and that pid. The kernel drops the lock when its process ends, however it ends,
    so a killed process never blocks the next run. The lock file is removed on release (and
    parent folders this lock created, when still empty). Taking the lock also removes stale
    temporary folders in the parent (`remove_stale_temporaries`). Where `fcntl` is missing
    (Windows) or the file system refuses locks, it locks nothing."""

    def __init__(self, out: str | os.PathLike[str], what: str = "output folder") -> None:
        self.out = Path(out).expanduser()
        self.what = what
        target = self.out.resolve()
        self.path = target.parent / f".{target.name}.lock"
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> OutputLock:
        parent = self.path.parent
        p = parent
        while not p.exists() and p != p.parent:
            self._created.append(p)
            p = p.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except BaseException as e:
            self._remove_created()
            if isinstance(e, OSError) and is_disk_full(e):
                raise disk_full_error(self.out, e, self.what) from e
            raise
        remove_stale_temporaries(parent)
        return self

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux/macOS
            return
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise OutputBusyError(
                    f"{self.what} {self.out} is being written by another process (pid {holder}; lock {self.path}); "
                    "wait for it to finish or choose another folder"
                ) from None
            except OSError:
                os.close(fd)  # a file system without locks: go on unlocked
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it between our open and our lock: take the new one
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise OutputBusyError(f"{self.what} {self.out}: could not take the lock {self.path}; retry")  # pragma: no cover

    def _remove_created(self) -> None:
        for p in self._created:  # deepest first; stops at the first one that is not empty
            try:
                p.rmdir()
            except OSError:
                break
        self._created = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    os.unlink(self.path)  # unlinked while still held: no one else can hold this file
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        self._remove_created()


def _lock_holder(fd: int) -> str:
    """The pid written in a held lock file (its holder may still be writing it)."""
    for _ in range(50):
        try:
            data = os.pread(fd, 64, 0).decode(errors="replace").strip()
        except OSError:
            break
        if data:
            return data
        time.sleep(0.01)
    return "unknown"
