"""The two passes of a merge over the plan: the global pass (norms for EnchTable's alpha, taken on
worker threads, cosines for Safe LoRA) and the merge pass (EnchTable's alpha-free decompositions
on worker threads ahead of the merge, so they overlap the merge and write of earlier tensors; one
merged tensor at a time, checked finite before it is yielded to the writer)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from ..io.checkpoints import LoraCheckpoint, SafetensorsCheckpoint, TensorSource
from ..io.safetensors_stream import (
    OutputTensor,
)
from ..methods.base import MergeMethod
from ..methods.finite import FiniteGuard, is_finite
from ..methods.interference import _intra_op_threads
from .pipeline import BufferPool, StageTimes, _prefetch
from .plan import (
    Plan,
    TauSource,
)


def _global_pass(method: MergeMethod, plan: Plan, taus: TauSource, get_delta: Any, progress: bool,
                 guard: FiniteGuard, times: StageTimes | None = None) -> set[str] | None:
    """Pass 1: global statistics (norms for EnchTable's alpha, cosines for Safe LoRA). A
    non-finite tau is refused here, before anything is written (with `allow_non_finite`, it is
    left out of the statistics). Returns the names whose tau was not finite (empty unless
    `allow_non_finite`), or None when the method wants no global pass (nothing was checked)."""
    if not method.wants_global_pass():
        return None
    non_finite: set[str] = set()
    names = ([n for n in plan.names if n not in plan.skipped] if method.global_pass_all_tensors
             else [n for n in plan.names if n in plan.merged])

    def load(n: str) -> tuple[Any, Any, Any]:
        # only read (tau = theta - reference is a new tensor): a memory map of the file where possible
        theta = None if taus.lora_direct or taus.ref is None else taus.task.view(n)
        return theta, taus.fetch(n), (get_delta(n) if n in plan.merged else None)

    def stage(n: str, item: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        theta, fetched, delta = item
        theta32 = theta.to(taus.device, torch.float32) if theta is not None else None
        tau = taus.tau_from(theta32, fetched, n) if taus.ref is not None else None
        return theta, fetched, delta, tau

    # A method with a `prepare_global` hook (EnchTable: the squared norms behind alpha) gets it
    # run here, on worker threads, for every finite (tau, delta) pair; `observe` then only adds.
    method_prepare = method.prepare_global if method.has_hook("prepare_global") else None
    observed = method.observed_in_prepare_global
    workers, threads = 1, torch.get_num_threads()

    def prepare(n: str, item: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        theta, fetched, delta, tau = stage(n, item)
        # finiteness is checked once, here on the worker (the main thread only reads the flags)
        tau_ok = tau is None or is_finite(tau)
        # get_delta already refused a non-finite delta unless allow_non_finite passes it through
        delta_ok = delta is None or not guard.allow or is_finite(delta)
        if method_prepare is not None and tau is not None and delta is not None and tau_ok and delta_ok:
            method_prepare(n, tau, delta)
            if observed(n):  # the method took its statistics here: hold no tensor until consumed
                return None, None, None, None, True, True
        if tau_ok:  # the inputs are needed only to name the culprit of a non-finite tau
            theta = fetched = None
        return theta, fetched, delta, tau, tau_ok, delta_ok

    if method_prepare is not None:
        workers = max(1, min(4, threads)) if taus.device.type == "cpu" else 2
    sizes = {o.name: math.prod(o.shape) * 4 for o in plan.outputs}
    t_wall = time.perf_counter()
    with _intra_op_threads(max(1, threads // workers) if taus.device.type == "cpu" else threads):
        for n, (theta, fetched, delta, tau, tau_ok, delta_ok) in tqdm(
                _prefetch(names, load, prepare, workers, sizes.get, 2 * max(sizes.values(), default=0), times,
                          max(1, threads // workers) if taus.device.type == "cpu" else None),
                total=len(names), desc=f"{method.name}: global pass", unit="tensor", disable=not progress):
            t0 = time.perf_counter()
            if not tau_ok:
                guard.fail(guard.culprit(n, [(theta, f"task model tensor {n!r} ({taus.task.where(n)})"),
                                             (fetched, _fetched_where(taus, n))])
                           or f"tau = task - reference of {n!r} overflows ({taus.task.where(n)})")
                non_finite.add(n)
                tau = None
            if not delta_ok:
                delta = None  # reported by get_delta; only reached with allow_non_finite
            method.observe(n, tau, delta)
            if times is not None:
                times.compute += time.perf_counter() - t0
    method.finish_global()
    if times is not None:
        times.wall += time.perf_counter() - t_wall
    return non_finite


def _fetched_where(taus: TauSource, name: str) -> str:
    if taus.lora_direct:
        return f"the LoRA update of {name!r} ({taus.task.where(name)})"
    assert taus.ref is not None
    return f"reference tensor {name!r} ({taus.ref.where(name)})"


def _merged_tensors(
    method: MergeMethod, plan: Plan, task: TensorSource, taus: TauSource, get_delta: Any, device: torch.device, progress: bool,
    guard: FiniteGuard, times: StageTimes | None = None, non_finite_tau: set[str] | None = None,
    pool: BufferPool | None = None,
) -> Iterator[tuple[str, OutputTensor, torch.Tensor]]:
    """Pass 2: yield (name, output spec, merged tensor in the output dtype), one at a time.
    Every output tensor is checked finite before it is yielded (so before it is written).
    `non_finite_tau` is what the global pass returned (None: tau is checked here).

    With `pool` (from `merge_pool`; CPU merges of local safetensors files), each merged tensor
    is copied from a memory map of the task file into a reused float32 buffer (one pass, any
    input dtype) and the output lands in reused buffers too; tensors the vector does not cover
    go to the writer straight from the map. The caller gives each yielded tensor back
    (`pool.give`) once it is written."""
    total = sum(o.nbytes for o in plan.outputs)
    specs = dict(zip(plan.names, plan.outputs))

    def load(n: str) -> tuple[Any, Any, Any]:
        if pool is not None:
            mapped = task.view(n)  # only read: the merge works on the pool's copy
            if n in plan.merged:
                theta = pool.take(mapped.shape, torch.float32)
                theta.copy_(mapped)
            else:
                theta = mapped
            del mapped
        else:
            theta = task.get(n)
        if n not in plan.merged:
            return theta, None, None
        fetched = taus.fetch(n) if method.needs_reference and not is_prepared(n) else None
        return theta, fetched, get_delta(n)

    # Tensors whose method-specific work was done in the global pass need no reference here.
    is_prepared = method.is_prepared
    from ..io.hub import HubCheckpoint

    # Tensors read from files are fresh buffers that the method may overwrite in place.
    fresh = isinstance(task, SafetensorsCheckpoint | HubCheckpoint | LoraCheckpoint)

    def stage(n: str, theta: Any, fetched: Any) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
        theta32 = theta.to(device, torch.float32)
        owned = fresh or theta32.data_ptr() != theta.data_ptr()
        tau = taus.tau_from(theta32, fetched, n) if method.needs_reference else None
        return theta32, owned, tau

    # A method with a `prepare` hook (EnchTable's decompositions) gets it run on worker threads
    # ahead of the merge; `merge_tensor` then finds its result.
    method_prepare = method.prepare if method.has_hook("prepare") else None
    prepare = None
    workers, threads = 1, torch.get_num_threads()
    if method_prepare is not None:
        def prepare(n: str, item: tuple[Any, Any, Any]) -> tuple[Any, ...]:
            theta, fetched, delta = item
            if n not in plan.merged:
                return item
            theta32, owned, tau = stage(n, theta, fetched)
            # a non-finite tau (only reached with allow_non_finite) is left to `merge_tensor`; the
            # global pass, where there was one, has checked every tau already
            finite = n not in non_finite_tau if non_finite_tau is not None else tau is not None and is_finite(tau)
            if not is_prepared(n) and tau is not None and finite:
                method_prepare(n, tau, delta)
            if is_prepared(n):  # the method holds what it needs: keep no reference or tau queued
                fetched = tau = None
            return (theta, fetched, delta, (theta32, owned, tau))

        if device.type == "cpu":
            workers = max(1, min(4, threads))
        else:
            workers = 2
    sizes = {o.name: math.prod(o.shape) * 4 for o in plan.outputs}
    budget = 2 * max(sizes.values(), default=0)
    # Two reads at a time when every input allows it (`TensorSource.parallel_reads`).
    sources = [task, *([taus.ref] if taus.ref is not None else []), getattr(get_delta, "source", None)]
    readers = 2 if all(getattr(s, "parallel_reads", False) for s in sources) else 1
    with tqdm(total=total, desc=f"{method.name}: merge", unit="B", unit_scale=True, disable=not progress) as bar, \
            _intra_op_threads(max(1, threads // workers) if device.type == "cpu" else threads):
        t_wall = time.perf_counter()
        for n, item in _prefetch(plan.names, load, prepare, workers, sizes.get, budget, times,
                                 max(1, threads // workers) if device.type == "cpu" else None, readers):
            t0 = time.perf_counter()
            theta, fetched, delta = item[:3]
            spec = specs[n]
            target = _tag_dtype(spec.dtype)
            probe: tuple[slice, torch.Tensor, torch.Tensor] | None = None
            if n in plan.merged:
                theta32, owned, tau = item[3] if len(item) > 3 else stage(n, theta, fetched)
                sl = _probe_slice(theta32.numel()) if target != torch.float32 else None
                before = theta32.reshape(-1)[sl].clone() if sl is not None else None
                method.theta_owned = owned
                theta = method.merge_tensor(n, theta32, tau, delta)
                if sl is not None and before is not None:
                    probe = (sl, before, theta.reshape(-1)[sl].to(torch.float32, copy=True))  # the buffer may go back to the pool
                if pool is not None and not _same_buffer(theta, theta32):
                    pool.give(theta32)  # the method returned a new tensor: its input buffer is free
                del theta32, tau
            if pool is not None and pool.owns(theta) and theta.dtype != target:
                out = pool.take(theta.shape, target)
                out.copy_(theta)
                pool.give(theta)
            else:
                if pool is not None and n in plan.merged and target != torch.float32:
                    pool.skip(spec.shape, target)  # planned by `merge_pool`, not needed here
                out = theta.to("cpu").to(target)
            if not is_finite(out):
                guard.fail(_explain_non_finite(n, spec, task, taus, fetched, delta))
            if probe is not None:
                method.report.setdefault(n, {})["patch_survival"] = _survival(probe, out)
            if times is not None:
                times.compute += time.perf_counter() - t0
            yield n, spec, out
            bar.update(spec.nbytes)
        if times is not None:
            times.wall += time.perf_counter() - t_wall


#: elements per tensor on which the patch's survival in the output dtype is measured (a fixed
#: stride through the tensor; the whole tensor when it is smaller)
SURVIVAL_SAMPLE = 1 << 16


def _probe_slice(numel: int) -> slice:
    return slice(0, numel, max(1, numel // SURVIVAL_SAMPLE))


def _survival(probe: tuple[slice, torch.Tensor, torch.Tensor], out: torch.Tensor) -> float | None:
    """How much of the patch `p = merged - task` (float32) the output dtype keeps: the share of
    `p` along itself in `round(merged) - task`, `<r, p> / <p, p>` (1: all of it, 0: none),
    on a strided sample of the tensor. None where the patch is zero there."""
    sl, before, after = probe
    p = (after - before).double()
    r = (out.reshape(-1)[sl].double() - before.double())
    pp = float(p.dot(p))
    return float(r.dot(p)) / pp if pp > 0 else None


def patch_survival_summary(report: dict[str, dict[str, Any]], dtype: str) -> tuple[dict[str, Any], list[str]] | None:
    """Min and median survival of the patch over the merged tensors, and the tensors keeping
    under half of their patch in the output dtype; None when nothing was measured (float32
    output keeps every patch whole)."""
    vals = {n: r["patch_survival"] for n, r in report.items() if isinstance(r, dict) and r.get("patch_survival") is not None}
    if not vals:
        return None
    xs = sorted(vals.values())
    below = sorted(n for n, v in vals.items() if v < 0.5)
    return {"output_dtype": dtype, "tensors": len(xs), "min": xs[0], "median": xs[len(xs) // 2],
            "below_half": len(below)}, below


def _same_buffer(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def merge_pool(plan: Plan, task: TensorSource, device: torch.device) -> BufferPool | None:
    """The buffer pool of a merge pass (see `_merged_tensors`), where one applies: a CPU merge
    whose task model's `view` is a memory map (`TensorSource.mapped_views`: local or downloaded
    safetensors files)."""
    if device.type != "cpu" or not task.mapped_views:
        return None
    uses: list[tuple[int, torch.dtype]] = []
    for name, spec in zip(plan.names, plan.outputs):
        if name in plan.merged:
            uses.append((math.prod(spec.shape), torch.float32))
            if _tag_dtype(spec.dtype) != torch.float32:
                uses.append((math.prod(spec.shape), _tag_dtype(spec.dtype)))
    return BufferPool(uses)


def _explain_non_finite(name: str, spec: OutputTensor, task: TensorSource, taus: TauSource,
                        fetched: torch.Tensor | None, delta: torch.Tensor | None) -> str:
    """Which input made output tensor `name` non-finite (the task tensor is re-read: the merge
    may have updated its buffer in place)."""
    checks: list[tuple[torch.Tensor | None, str]] = [(task.get(name), f"task model tensor {name!r} ({task.where(name)})")]
    if fetched is not None:
        checks.append((fetched, _fetched_where(taus, name)))
    if delta is not None:
        checks.append((delta, f"safety vector tensor {name!r}"))
    return task_culprit if (task_culprit := FiniteGuard(True).culprit(name, checks)) else (
        f"merged tensor {name!r} is not finite in the output dtype {spec.dtype} (overflow; try dtype: float32 "
        "or a smaller scale)"
    )


def _tag_dtype(tag: str) -> torch.dtype:
    from ..io.safetensors_stream import DTYPE_TAGS

    return DTYPE_TAGS[tag]
