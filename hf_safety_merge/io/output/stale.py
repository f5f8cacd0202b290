"""Temporary folders left by a killed process: the `TMP_MARKER` each temporary folder holds
(pid, process start, host) and `remove_stale_temporaries`, which removes those of processes that
no longer run (docs/reliability.md, "Faults").

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("hf_safety_merge")

#: the file inside each temporary folder of this library: which process made it (JSON)
TMP_MARKER = ".hf-safety-merge-tmp"


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
