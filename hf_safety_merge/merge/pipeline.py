"""The streaming pipeline of a merge pass: reads on a background thread, optional per-tensor
work (EnchTable's decompositions) on a worker pool, results consumed in order, and the busy
time of each stage (to report the achieved overlap)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


class StageTimes:
    """Busy seconds of each pipeline stage of a merge pass, to report the achieved overlap."""

    def __init__(self) -> None:
        self.read = 0.0
        self.prepare = 0.0
        self.compute = 0.0
        self.write = 0.0
        self.wall = 0.0

    def as_dict(self) -> dict[str, float]:
        busy = self.read + self.prepare + self.compute + self.write
        longest = max(self.read, self.prepare, self.compute, self.write)
        # 1.0: the stages ran fully concurrently (wall = the longest stage); 0.0: one after another.
        hidden = (busy - self.wall) / (busy - longest) if busy - longest > 1e-9 else 1.0
        return {"read_s": self.read, "prepare_s": self.prepare, "compute_s": self.compute, "write_s": self.write,
                "wall_s": self.wall, "overlap": max(0.0, min(1.0, hidden))}


def _timed(fn: Any, times: StageTimes | None, stage: str) -> Any:
    if times is None:
        return fn

    def run(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            setattr(times, stage, getattr(times, stage) + time.perf_counter() - t)

    return run


#: items queued per prepare worker (see `_prefetch`)
LOOKAHEAD_PER_WORKER = 16


def _prefetch(names: list[str], load: Any, prepare: Any = None, workers: int = 1,
              nbytes: Any = None, budget: int = 0, times: StageTimes | None = None,
              worker_threads: int | None = None, readers: int = 1) -> Iterator[tuple[str, Any]]:
    """Yield (name, load(name)) in order, reading ahead on a background thread while the caller
    computes on the current ones (positional reads release the GIL).

    With `prepare`, each loaded item is then passed through `prepare(name, item)` on a pool of
    `workers` threads (EnchTable's decompositions of the next matrices run while the current
    one is merged and written). Reads are submitted in order (to one reader thread unless
    `readers` says more) and results are consumed in order, so errors surface at the same
    tensor as without look-ahead. Items are submitted ahead
    while the bytes in flight (`nbytes(name)`) stay within `budget` (at least one item ahead).
    `readers` > 1 runs that many reads at once (for sources whose reads are thread-safe: local
    safetensors files; a read is a memory copy from the page cache, and on a pass that only adds
    tensors one reader thread is the bottleneck); results are still consumed in order."""
    if not names:
        return
    load = _timed(load, times, "read")
    # With `prepare`, items finish out of order (a k_proj decomposes far faster than a
    # gate_proj) but are consumed in order: a short queue leaves a worker idle behind a slow
    # item, so the queue holds LOOKAHEAD_PER_WORKER items per worker (bytes still bound it).
    ahead = LOOKAHEAD_PER_WORKER * max(1, workers) if prepare is not None else max(1, workers)
    with ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="hf-safety-merge-read") as ex, \
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hf-safety-merge-prepare",
                               # OpenMP/MKL thread counts are per thread: set them in each worker
                               initializer=(lambda: torch.set_num_threads(worker_threads)) if worker_threads else None) as pool:
        prep = _timed(prepare, times, "prepare") if prepare is not None else None
        pending: deque[tuple[str, Any, int]] = deque()
        in_flight = 0
        nxt = 0

        def submit(n: str) -> Any:
            fut = ex.submit(load, n)
            if prep is None:
                return fut
            def chained(f: Any = fut, n: str = n) -> Any:
                return prep(n, f.result())

            return pool.submit(chained)

        while nxt < len(names) or pending:
            while nxt < len(names) and (not pending or (len(pending) < ahead and (
                    nbytes is None or in_flight + nbytes(names[nxt]) <= budget))):
                size = nbytes(names[nxt]) if nbytes is not None else 0
                pending.append((names[nxt], submit(names[nxt]), size))
                in_flight += size
                nxt += 1
            n, fut, size = pending.popleft()
            try:
                cur = fut.result()
                in_flight -= size
                yield n, cur
            except BaseException:  # an error here or in the consumer (GeneratorExit): stop reading ahead
                for _, f, _ in pending:
                    f.cancel()
                raise
