"""Writing an output folder so that nothing is ever half-written or lost.

- `check_output_dir` runs before any input is opened: the location is a folder (or can be
  created), is writable, is empty (or `overwrite`), and is not one of the inputs.
- `AtomicDir` writes into a hidden temporary folder beside the target and moves it into place
  only when everything was written; on any error, Ctrl-C or SIGTERM the temporary folder is
  removed and an existing target is left as it was. The result gets the permissions
  `save_pretrained` gives a folder (0777 minus the umask), not `mkdtemp`'s 0700.
- `terminate_as_interrupt` turns SIGTERM into an `Interrupted` exception in the main thread,
  so the same clean-up runs for `kill` as for Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from ..errors import ConfigError, DiskSpaceError


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGINT / SIGTERM); clean-up has run."""

    def __init__(self, signame: str = "SIGINT") -> None:
        super().__init__(signame)
        self.signame = signame

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signame, signal.SIGINT))


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return mask


def _local_inputs(inputs: Iterable[str | os.PathLike[str] | None]) -> list[Path]:
    paths = []
    for ref in inputs:
        if ref is None:
            continue
        p = Path(ref).expanduser()
        if p.exists():
            paths.append(p.resolve())
    return paths


def check_output_dir(
    out: str | os.PathLike[str],
    overwrite: bool,
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    what: str = "output folder",
    hint: str = "set overwrite: true (CLI: --overwrite) to replace it",
) -> Path:
    """Check, without creating or reading anything, that `out` can receive a new folder.

    Raises `ConfigError` when `out` or one of its parents is a regular file, when the first
    existing parent is not writable, when `out` is a non-empty folder and not `overwrite`, or
    when `out` is (or contains) one of the local `inputs` (which overwriting would delete).
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {out} exists and is a file, not a folder; choose another path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {out}: {parent} is a file, so no folder can be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {out}: {parent} is not writable")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{what} {out} exists and is not empty; {hint}")
    target = out.resolve()
    for p in _local_inputs(inputs):
        if p == target or target in p.parents:
            raise ConfigError(f"{what} {out} is (or contains) the input {p}; writing there would destroy it")
    return out


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


class AtomicDir:
    """`with AtomicDir(out, overwrite) as tmp: ...write into tmp...; atomic.commit()`."""

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.out = Path(out).expanduser()
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> AtomicDir:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self

    @property
    def path(self) -> Path:
        assert self.tmp is not None, "AtomicDir used outside its `with` block"
        return self.tmp

    def commit(self) -> Path:
        """Move the finished folder into place (replacing an old one only if `overwrite`)."""
        tmp = self.path
        os.chmod(tmp, 0o777 & ~_umask())
        old: Path | None = None
        if self.out.exists():
            if not self.overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
                raise ConfigError(f"output folder {self.out} appeared while writing and is not empty; nothing was replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / "x")
        try:
            os.replace(tmp, self.out)
        except BaseException:
            if old is not None:
                os.replace(old / "x", self.out)  # put the user's folder back
                shutil.rmtree(old, ignore_errors=True)
            raise
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Interrupted('SIGTERM')` in the main thread (when nobody
    else handles SIGTERM), so `finally` clean-up runs as it does for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> Any:
        raise Interrupted("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
