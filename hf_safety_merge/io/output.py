"""Writing an output folder so that nothing is ever half-written or lost.

- `check_output_dir` runs before any input is opened: the location is a folder (or can be
  created), is writable, is empty (or `overwrite`), and is not one of the inputs.
- `AtomicDir` writes into a hidden temporary folder beside the target and moves it into place
  only when everything was written; on any error, Ctrl-C or SIGTERM the temporary folder is
  removed and an existing target is left as it was. The result gets the permissions
  `save_pretrained` gives a folder (0777 minus the umask), not `mkdtemp`'s 0700.
- `terminate_as_interrupt` turns SIGTERM into an `Interrupted` exception in the main thread,
  so the same clean-up runs for `kill` as for Ctrl-C.
- Faults a `finally` cannot clean up (docs/reliability.md, "Faults"): each temporary folder
  holds a marker (`TMP_MARKER`: pid, process start, host), so that the next run into the same
  parent removes the folders of a process that was killed (`remove_stale_temporaries`);
  `OutputLock` (an `flock` on `.NAME.lock` beside the output) lets one writer at a time into an
  output folder; a disk that fills during a write becomes one `DiskSpaceError`
  (`is_disk_full`, `disk_full_error`), the temporary folder removed, the old output intact.
- `sha256_file` / `sha256_files`: streamed file hashes for the merge report and `--verify`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from ..errors import ConfigError, DiskSpaceError, OutputBusyError

logger = logging.getLogger("hf_safety_merge")

#: the file inside each temporary folder of this library: which process made it (JSON)
TMP_MARKER = ".hf-safety-merge-tmp"
#: read size of `sha256_file` (large sequential reads; the buffer is reused)
HASH_CHUNK = 4 * 2**20
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


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


# ------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------
# Temporary folders left by a killed process
# ------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state first; index 19 is the start time), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _process_start(pid: int) -> str | None:
    f = _proc_stat(pid)
    return f[19] if f is not None and len(f) > 19 else None


def _write_marker(folder: Path) -> None:
    info = {"pid": os.getpid(), "start": _process_start(os.getpid()), "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / TMP_MARKER).write_text(json.dumps(info) + "\n")


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / TMP_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def _process_gone(info: dict[str, Any]) -> bool:
    """Whether the process that wrote a marker has certainly ended (False when unsure: another
    host, or a process that may be it)."""
    if info.get("host") != socket.gethostname():
        return False  # a shared folder: a pid of another machine cannot be checked
    pid = int(info["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return False
    if stat[0] == "Z":
        return True  # killed, not yet reaped by its parent
    start = info.get("start")
    return start is not None and len(stat) > 19 and stat[19] != start  # the pid was reused


def remove_stale_temporaries(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary folders this library left in `parent` when a process was killed
    (SIGKILL, power loss): hidden `.NAME.tmp-*` / `.NAME.old-*` folders whose `TMP_MARKER`
    names a process of this host that no longer runs. A folder without the marker, or whose
    process runs, is never touched. A `.NAME.old-*` folder holds the previous output, moved
    aside by a commit that was cut between its two renames: it is put back when `NAME` is
    missing. One warning per folder; returns the folders removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or (".tmp-" not in name and ".old-" not in name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        folder = Path(entry.path)
        info = _read_marker(folder)
        if info is None or not _process_gone(info):
            continue
        note = ""
        if ".old-" in name:
            target = folder.parent / name[1 : name.rindex(".old-")]
            kept = folder / "x"
            if kept.is_dir() and not os.path.lexists(target):
                try:
                    os.replace(kept, target)
                    note = f"; its previous output folder was put back at {target}"
                except OSError:
                    continue  # keep everything rather than lose the user's folder
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            continue
        removed.append(folder)
        logger.warning("removed %s, a temporary folder left by hf-safety-merge process %s (started %s), which no "
                       "longer runs%s", folder, info["pid"], info.get("created", "?"), note)
    return removed


# ------------------------------------------------------------------------------------------
# One writer per output folder
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# File hashes
# ------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], chunk: int = HASH_CHUNK) -> str:
    """The sha256 of a file, read in `chunk`-byte pieces into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]], workers: int | None = None) -> dict[Path, str]:
    """sha256 of several files, on up to `workers` threads (hashlib releases the GIL)."""
    files = list(dict.fromkeys(Path(p) for p in paths))
    n = workers or min(4, os.cpu_count() or 1)
    if len(files) <= 1 or n <= 1:
        return {f: sha256_file(f) for f in files}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(n, len(files)), thread_name_prefix="hf-safety-merge-hash") as ex:
        return dict(zip(files, ex.map(sha256_file, files), strict=True))


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
