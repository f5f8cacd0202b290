"""The managed server's processes: the supervisor script that leads the server's process group
and takes it down (on a signal, when its parent goes away, or when the server exits), the
parent-death signal, a free port, and whether a process group is still alive.

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `assets`, `testing` and `io`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# The group leader: starts the server command in its own (the new) process group, and takes the
# whole group down (SIGTERM, then SIGKILL after the grace period) when it is signalled, when its
# parent (the library's process) goes away, or when the server exits on its own.
_SUPERVISOR = r"""
import os, signal, subprocess, sys, time
parent, grace, cmd = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
server = subprocess.Popen(cmd)
def others():
    me, group, found = os.getpid(), os.getpgid(0), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            try:
                if os.getpgid(int(d)) == group:
                    found.append(int(d))
            except OSError:
                pass
    return found
def down(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.killpg(0, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + grace
    while time.monotonic() < end and server.poll() is None:
        time.sleep(0.2)
    code = server.poll()
    if os.path.isdir("/proc"):
        for pid in others():  # engine-core / worker processes that outlived the server
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    else:
        os.killpg(0, signal.SIGKILL)
    sys.exit(143 if code is None else code)
signal.signal(signal.SIGTERM, down)
signal.signal(signal.SIGINT, down)
while server.poll() is None:
    if os.getppid() != parent:
        down()
    time.sleep(0.5)
down()
"""


def _parent_death_signal() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for killpg; look for a live member
    try:
        out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return any(s and not s.startswith("Z") for s in out.split())
