"""SIGKILL mid-merge and two writers (issue 35).

A merge killed with SIGKILL runs no clean-up: nothing may appear under the output name, and the
next run into the same parent removes the marked temporary folder it left (one warning line).
Two merges into one folder: one wins, the other fails at once naming the folder and the first
one's pid; the lock of a killed process never blocks the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.errors import OutputBusyError
from hf_safety_merge.io.output import TMP_MARKER, OutputLock, remove_stale_temporaries


@pytest.fixture(scope="module")
def vec(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vec") / "vec"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False, subspaces=False)
    return out


def _cfg(fam: dict[str, Path], vec: Path, out: Path) -> SafetyMergeConfig:
    return SafetyMergeConfig(task_model=str(fam["task"]), task_reference=str(fam["aligned"]), safety_vector=str(vec),
                             method="task_arithmetic", output_dir=str(out))


def _child(fam: dict[str, Path], vec: Path, out: Path, after_first_tensor: str) -> subprocess.Popen[str]:
    """A merge in another process; `after_first_tensor` runs in it once the first tensor is on disk."""
    head = textwrap.dedent("""
        import os, signal, sys, time
        from pathlib import Path
        from hf_safety_merge import SafetyMergeConfig, merge
        from hf_safety_merge.io import safetensors_stream as ss

        real = ss.StreamingShardWriter.write
        def write(self, name, tensor):
            real(self, name, tensor)
            if self._pos == 1:
                self._fh.flush()  # the first tensor is on disk
    """)
    tail = textwrap.dedent(f"""
        ss.StreamingShardWriter.write = write
        cfg = SafetyMergeConfig(task_model={str(fam["task"])!r}, task_reference={str(fam["aligned"])!r},
                                safety_vector={str(vec)!r}, method="task_arithmetic", output_dir={str(out)!r})
        merge(cfg, progress=False)
    """)
    code = head + textwrap.dedent(after_first_tensor) + tail
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child merge ended early ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}")
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.02)


def test_sigkill_mid_merge_leaves_nothing_under_the_name_and_the_next_run_cleans_up(
        llama_family: dict[str, Path], vec: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "patched"
    proc = _child(llama_family, vec, out, """
        _write = write
        def write(self, name, tensor):
            _write(self, name, tensor)
            if self._pos == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read() if proc.stdout else ""

    assert not out.exists(), "no partial output may be visible under the output name"
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".patched.tmp-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").is_file()
    marker = json.loads((stale[0] / TMP_MARKER).read_text())
    assert marker["pid"] == proc.pid
    # the killed process's lock file stays, but the kernel released its lock
    assert (tmp_path / ".patched.lock").read_text().strip() == str(proc.pid)

    caplog.set_level("WARNING", logger="hf_safety_merge")
    merge(_cfg(llama_family, vec, out), progress=False)
    removed = [r.getMessage() for r in caplog.records if "temporary folder" in r.getMessage()]
    assert len(removed) == 1 and "\n" not in removed[0], removed
    assert removed[0].startswith(f"removed {stale[0]}, a temporary folder left by hf-safety-merge process {proc.pid} ")
    assert removed[0].endswith("which no longer runs")
    assert not stale[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patched"], "no temporary folder or lock file is left"
    assert len(load_file(out / "model.safetensors")) > 0 and TMP_MARKER not in os.listdir(out)


def test_only_marked_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def folder(name: str, marker: dict[str, object] | None) -> Path:
            p = tmp_path / name
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"x")
            if marker is not None:
                (p / TMP_MARKER).write_text(json.dumps(marker))
            return p

        import socket

        host = socket.gethostname()
        unmarked = folder(".a.tmp-unmarked", None)
        running = folder(".b.tmp-running", {"pid": alive.pid, "host": host})
        mine = folder(".c.tmp-mine", {"pid": os.getpid(), "host": host})
        other_host = folder(".d.tmp-remote", {"pid": dead.pid, "host": host + "-elsewhere"})
        not_ours = folder("e.tmp-visible", {"pid": dead.pid, "host": host})  # not a hidden temporary name
        gone = folder(".f.tmp-gone", {"pid": dead.pid, "host": host})
        # a commit killed between its two renames: the previous output waits in .NAME.old-*/x
        moved = folder(".g.old-cut", {"pid": dead.pid, "host": host})
        (moved / "x").mkdir()
        (moved / "x" / "mine.txt").write_text("previous output")

        assert set(remove_stale_temporaries(tmp_path)) == {gone, moved}
        for kept in (unmarked, running, mine, other_host, not_ours):
            assert kept.is_dir(), kept
        assert not gone.exists() and not moved.exists()
        assert (tmp_path / "g" / "mine.txt").read_text() == "previous output", "the previous output is put back"
    finally:
        alive.kill()
        alive.wait()


def test_two_merges_into_one_folder(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    out = tmp_path / "patched"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = _child(llama_family, vec, out, f"""
        _write = write
        def write(self, name, tensor):
            _write(self, name, tensor)
            if self._pos == 1:
                Path({str(ready)!r}).touch()
                end = time.monotonic() + 120
                while not Path({str(go)!r}).exists() and time.monotonic() < end:
                    time.sleep(0.02)
    """)
    try:
        _wait_for(ready, first)  # the first merge holds the folder and is writing
        t = time.perf_counter()
        with pytest.raises(OutputBusyError) as info:
            merge(_cfg(llama_family, vec, out), progress=False)
        seconds = time.perf_counter() - t
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"output folder {out} is being written by another process "
                                                  f"(pid {first.pid}; lock {tmp_path / '.patched.lock'})"), msg
        assert seconds < 5.0, f"the second merge must fail at once (not wait for the lock), took {seconds:.2f}s"
    finally:
        go.touch()
        first.wait(timeout=120)
    assert first.returncode == 0, first.stdout.read() if first.stdout else ""

    # the winner's output is complete: the same tensors as a merge on its own
    alone = tmp_path / "alone"
    merge(_cfg(llama_family, vec, alone), progress=False)
    got, want = load_file(out / "model.safetensors"), load_file(alone / "model.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "go", "patched", "ready"]


def test_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    out = tmp_path / "patched"
    code = (f"import os, signal\nfrom hf_safety_merge.io.output import OutputLock\n"
            f"lock = OutputLock({str(out)!r}).__enter__()\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    lock_file = tmp_path / ".patched.lock"
    assert lock_file.is_file(), "the killed holder left its lock file"
    t = time.perf_counter()
    with OutputLock(out):
        assert lock_file.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()}"):
            OutputLock(out).__enter__()  # another open of the file (a second writer in this process)
    assert time.perf_counter() - t < 5.0  # no waiting on a dead holder (generous: a busy 2-core machine)
    assert not lock_file.exists()
