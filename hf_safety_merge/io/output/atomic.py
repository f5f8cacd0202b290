"""Atomic output folders: `check_output_dir` (before any input is opened) and `AtomicDir`, which
writes into a hidden temporary folder and moves it into place only when everything was written.

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from ...errors import ConfigError, DiskSpaceError
from .space import disk_full_error, is_disk_full
from .stale import TMP_MARKER, _write_marker, remove_stale_temporaries


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


class AtomicDir:
    """`with AtomicDir(out, overwrite) as tmp: ...write into tmp...; atomic.commit()`.

    The temporary folder `.NAME.tmp-XXXX` beside `out` holds a `TMP_MARKER` until it is moved
    into place, so that a run killed with SIGKILL (no clean-up runs) leaves a folder the next
    run recognises as its own and removes. A disk that fills while writing raises one
    `DiskSpaceError`; the temporary folder is removed and `out` is left as it was."""

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False, what: str = "output folder") -> None:
        self.out = Path(out).expanduser()
        self.overwrite = overwrite
        self.what = what
        self.tmp: Path | None = None

    def __enter__(self) -> AtomicDir:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out.parent)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
            _write_marker(self.tmp)
        except OSError as e:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            if is_disk_full(e):
                raise disk_full_error(self.out, e, self.what) from e
            raise
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
            try:
                # marked first: killed between the two renames below, the next run puts it back
                _write_marker(old)
            except BaseException:
                shutil.rmtree(old, ignore_errors=True)
                raise
            os.replace(self.out, old / "x")
        try:
            (tmp / TMP_MARKER).unlink(missing_ok=True)  # the marker never reaches the output
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
        if exc is not None and not isinstance(exc, DiskSpaceError) and is_disk_full(exc):
            raise disk_full_error(self.out, exc, self.what) from exc
