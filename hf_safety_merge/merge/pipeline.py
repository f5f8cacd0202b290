"""The streaming pipeline of a merge pass: reads on a background thread, optional per-tensor
work (EnchTable's decompositions) on a worker pool, results consumed in order, and the busy
time of each stage (to report the achieved overlap)."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
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


class BufferPool:
    """Reusable CPU buffers for a pass whose tensor shapes are known up front.

    A merge pass reads each tensor into a buffer, merges in place and hands the buffer to the
    writer; with a fresh `torch.empty` per tensor, every page of every buffer is a new page from
    the kernel (a fault and a zeroing per 4 KiB: for SmolLM2-135M, 513 MiB of fresh pages per
    pass, ~40% of the pass). Here a buffer the writer has finished with (`give`) is handed out
    again for the next tensor of the same size and dtype (`take`). `uses` is every planned take's
    (number of elements, dtype): a buffer given back is kept only while more takes of its size
    and dtype are still to come than free buffers of it are held (else it is dropped), so the
    pool holds no more than the tensors in flight and nothing once the pass is done. Thread-safe."""

    def __init__(self, uses: Iterable[tuple[int, torch.dtype]]) -> None:
        self._left: Counter[tuple[int, torch.dtype]] = Counter(uses)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        #: takes served from a given-back buffer, and takes that needed a new one
        self.reused = 0
        self.allocated = 0

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor of `shape` and `dtype` (reused where one is free)."""
        key = (math.prod(shape), dtype)
        with self._lock:
            self._left[key] -= 1
            free = self._free.get(key)
            flat = free.pop() if free else None
            if flat is not None:
                self.reused += 1
        new = flat is None
        if flat is None:  # allocated outside the lock: other threads take and give meanwhile
            flat = torch.empty(key[0], dtype=dtype)
        with self._lock:
            self.allocated += new
            if flat.numel():
                self._lent[flat.data_ptr()] = flat
        return flat.view(tuple(shape))

    def skip(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> None:
        """A planned take that will not happen (so that no buffer is kept for it)."""
        key = (math.prod(shape), dtype)
        with self._lock:
            self._left[key] -= 1
            free = self._free.get(key)
            while free and len(free) > self._left[key]:
                free.pop()

    def owns(self, t: torch.Tensor) -> bool:
        """Whether `t` views a buffer this pool lent out (and that was not given back)."""
        return t.numel() > 0 and t.data_ptr() in self._lent

    def give(self, t: torch.Tensor) -> None:
        """Return a buffer from `take` once nothing reads or writes it any more; anything else
        (a tensor the pool did not lend) is ignored."""
        if not t.numel():
            return
        with self._lock:
            flat = self._lent.pop(t.data_ptr(), None)
            if flat is None:
                return
            key = (flat.numel(), flat.dtype)
            free = self._free.setdefault(key, [])
            if len(free) < self._left[key]:  # kept only for a take still to come
                free.append(flat)

    def held_bytes(self) -> int:
        """Bytes of free buffers the pool keeps for later takes."""
        with self._lock:
            return sum(f.numel() * f.element_size() for fs in self._free.values() for f in fs)


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
