"""The streaming merge engine.

sources (task model or base + LoRA, reference, safety vector) -> plan (validated from headers
alone) -> optional global pass (norms, cosines) -> per-tensor merge -> sharded writer -> model
folder (weights, config, tokenizer, card, report), written to a temporary folder and renamed at
the end so that a failed merge leaves nothing behind.

The plan and the inputs live in `merge.plan`, the streaming pipeline (read-ahead, worker pool,
stage times) in `merge.pipeline`, the NaN/Inf guard in `merge.finite`; this module runs the
passes and writes the folder (`merge`), or patches a model in memory (`apply_safety_vector`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import SafetyMergeConfig
from ..errors import ConfigError
from ..io.checkpoints import LoraCheckpoint, SafetensorsCheckpoint, TensorSource
from ..io.hub import AUX_PATTERNS, check_push_target, open_checkpoint
from ..io.output import AtomicDir, check_output_dir, terminate_as_interrupt
from ..io.safetensors_stream import (
    BackgroundShardWriter,
    OutputTensor,
    StreamingShardWriter,
)
from ..io.sink import card_sink
from ..vectors import SafetyVector
from .base import MergeMethod, build_method
from .finite import _FiniteGuard, _is_finite
from .interference import _intra_op_threads
from .pipeline import StageTimes, _prefetch
from .plan import (
    _delta_getter,
    _open_reference,
    _open_task,
    _Plan,
    _TauSource,
    _validate_plan,
)

REPORT_NAME = "merge_report.json"
logger = logging.getLogger("hf_safety_merge")


@dataclass
class MergeResult:
    """What a merge did: where the model is, global quantities and per-tensor diagnostics."""

    output_dir: Path
    method: str
    summary: dict[str, Any]
    tensors: dict[str, dict[str, Any]]
    num_tensors: int
    num_merged: int
    seconds: float
    files: list[str] = field(default_factory=list)
    commit_url: str | None = None
    pr_url: str | None = None
    #: busy seconds of each stage of the merge pass (read, prepare, compute, write), its wall
    #: time and the achieved overlap (1: stages fully concurrent, 0: one after another)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"Merged with {self.method}: {self.num_merged}/{self.num_tensors} tensors patched in {self.seconds:.1f}s",
            f"  output: {self.output_dir}",
        ]
        for k, v in self.summary.items():
            lines.append(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
        if self.pr_url:
            lines.append(f"  pushed as pull request: {self.pr_url}")
        elif self.commit_url:
            lines.append(f"  pushed: {self.commit_url}")
        return "\n".join(lines)


def _copy_aux_files(task: TensorSource, cfg: SafetyMergeConfig, out: Path) -> list[str]:
    copied: list[str] = []
    folders: list[Path] = []
    if isinstance(task, LoraCheckpoint):
        folders.append(task.adapter_dir)  # tokenizer saved with the adapter wins (added tokens)
    if task.path is not None:
        folders.append(task.path)
    for name in AUX_PATTERNS:
        for folder in folders:
            src = folder / name
            if src.is_file():
                if name == "config.json" and isinstance(task, LoraCheckpoint) and folder == task.adapter_dir:
                    continue
                shutil.copyfile(src, out / name)
                copied.append(name)
                break
    cfg_file = out / "config.json"
    if cfg_file.is_file() and cfg.dtype != "auto":
        data = json.loads(cfg_file.read_text())
        data["dtype"] = cfg.dtype
        data.pop("torch_dtype", None)
        cfg_file.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def _global_pass(method: MergeMethod, plan: _Plan, taus: _TauSource, get_delta: Any, progress: bool,
                 guard: _FiniteGuard, times: StageTimes | None = None) -> None:
    """Pass 1: global statistics (norms for EnchTable's alpha, cosines for Safe LoRA). A
    non-finite tau is refused here, before anything is written (with `allow_non_finite`, it is
    left out of the statistics)."""
    if not method.wants_global_pass():
        return
    names = plan.names if method.global_pass_all_tensors else [n for n in plan.names if n in plan.merged]

    def load(n: str) -> tuple[Any, Any, Any]:
        theta = None if taus.lora_direct or taus.ref is None else taus.task.get(n)
        return theta, taus.fetch(n), (get_delta(n) if n in plan.merged else None)

    def stage(n: str, item: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        theta, fetched, delta = item
        theta32 = theta.to(taus.device, torch.float32) if theta is not None else None
        tau = taus.tau_from(theta32, fetched, n) if taus.ref is not None else None
        return theta, fetched, delta, tau

    # A method with a `prepare` hook (EnchTable: the alpha-independent decompositions) gets it
    # run here, on worker threads, for every finite (tau, delta) pair: the global pass reads
    # every input anyway, and the merge pass then needs no reference tensor for them.
    method_prepare = getattr(method, "prepare", None)
    workers, threads = 1, torch.get_num_threads()

    def prepare(n: str, item: tuple[Any, Any, Any]) -> tuple[Any, ...]:
        theta, fetched, delta, tau = stage(n, item)
        # finiteness is checked once, here on the worker (the main thread only reads the flags)
        tau_ok = tau is None or _is_finite(tau)
        delta_ok = delta is None or _is_finite(delta)
        if method_prepare is not None and tau is not None and delta is not None and tau_ok and delta_ok:
            method_prepare(n, tau, delta)
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
                tau = None
            if not delta_ok:
                delta = None  # reported by get_delta; only reached with allow_non_finite
            method.observe(n, tau, delta)
            if times is not None:
                times.compute += time.perf_counter() - t0
    method.finish_global()
    if times is not None:
        times.wall += time.perf_counter() - t_wall


def _fetched_where(taus: _TauSource, name: str) -> str:
    if taus.lora_direct:
        return f"the LoRA update of {name!r} ({taus.task.where(name)})"
    assert taus.ref is not None
    return f"reference tensor {name!r} ({taus.ref.where(name)})"


def _merged_tensors(
    method: MergeMethod, plan: _Plan, task: TensorSource, taus: _TauSource, get_delta: Any, device: torch.device, progress: bool,
    guard: _FiniteGuard, times: StageTimes | None = None,
) -> Iterator[tuple[str, OutputTensor, torch.Tensor]]:
    """Pass 2: yield (name, output spec, merged tensor in the output dtype), one at a time.
    Every output tensor is checked finite before it is yielded (so before it is written)."""
    total = sum(o.nbytes for o in plan.outputs)
    specs = dict(zip(plan.names, plan.outputs))

    def load(n: str) -> tuple[Any, Any, Any]:
        theta = task.get(n)
        if n not in plan.merged:
            return theta, None, None
        fetched = taus.fetch(n) if method.needs_reference and not is_prepared(n) else None
        return theta, fetched, get_delta(n)

    # Tensors whose method-specific work was done in the global pass need no reference here.
    is_prepared = getattr(method, "is_prepared", lambda n: False)
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
    method_prepare = getattr(method, "prepare", None)
    prepare = None
    workers, threads = 1, torch.get_num_threads()
    if method_prepare is not None:
        def prepare(n: str, item: tuple[Any, Any, Any]) -> tuple[Any, ...]:
            theta, fetched, delta = item
            if n not in plan.merged:
                return item
            staged = stage(n, theta, fetched)
            if not is_prepared(n):
                method_prepare(n, staged[2], delta)
            return (theta, fetched, delta, staged)

        if device.type == "cpu":
            workers = max(1, min(4, threads))
        else:
            workers = 2
    sizes = {o.name: math.prod(o.shape) * 4 for o in plan.outputs}
    budget = 2 * max(sizes.values(), default=0)
    with tqdm(total=total, desc=f"{method.name}: merge", unit="B", unit_scale=True, disable=not progress) as bar, \
            _intra_op_threads(max(1, threads // workers) if device.type == "cpu" else threads):
        t_wall = time.perf_counter()
        for n, item in _prefetch(plan.names, load, prepare, workers, sizes.get, budget, times,
                                 max(1, threads // workers) if device.type == "cpu" else None):
            t0 = time.perf_counter()
            theta, fetched, delta = item[:3]
            spec = specs[n]
            if n in plan.merged:
                theta32, owned, tau = item[3] if len(item) > 3 else stage(n, theta, fetched)
                method.theta_owned = owned
                theta = method.merge_tensor(n, theta32, tau, delta)
                del theta32, tau
            out = theta.to("cpu").to(_tag_dtype(spec.dtype))
            if not _is_finite(out):
                guard.fail(_explain_non_finite(n, spec, task, taus, fetched, delta))
            if times is not None:
                times.compute += time.perf_counter() - t0
            yield n, spec, out
            bar.update(spec.nbytes)
        if times is not None:
            times.wall += time.perf_counter() - t_wall


def _explain_non_finite(name: str, spec: OutputTensor, task: TensorSource, taus: _TauSource,
                        fetched: torch.Tensor | None, delta: torch.Tensor | None) -> str:
    """Which input made output tensor `name` non-finite (the task tensor is re-read: the merge
    may have updated its buffer in place)."""
    checks: list[tuple[torch.Tensor | None, str]] = [(task.get(name), f"task model tensor {name!r} ({task.where(name)})")]
    if fetched is not None:
        checks.append((fetched, _fetched_where(taus, name)))
    if delta is not None:
        checks.append((delta, f"safety vector tensor {name!r}"))
    return task_culprit if (task_culprit := _FiniteGuard(True).culprit(name, checks)) else (
        f"merged tensor {name!r} is not finite in the output dtype {spec.dtype} (overflow; try dtype: float32 "
        "or a smaller scale)"
    )


def _summary(method: MergeMethod) -> dict[str, Any]:
    summary = method.summary()
    ws = [r["w"] for r in method.report.values() if "w" in r]
    if ws:
        summary.update({"w_mean": sum(ws) / len(ws), "w_min": min(ws), "w_max": max(ws)})
    return summary


def merge(
    config: SafetyMergeConfig,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    finalize: Callable[[Path], list[str]] | None = None,
    method_instance: MergeMethod | None = None,
) -> MergeResult:
    """Merge a safety vector into a fine-tuned model as `config` says and write the result.

    `finalize(folder)` may add files to the finished folder before it is moved into place (it
    returns their names); calibration uses it for its card section and plot, and passes
    `method_instance` (the configured method with the per-matrix weights it already computed).

    Every input is validated from headers (names, shapes, dtypes, architecture, vocabulary,
    tied embeddings) before a weight is read (for Hub repos: before a weight is downloaded);
    the model is streamed tensor by tensor, so peak memory is a few tensors regardless of model
    or shard size. With `config.push_to_hub`, the folder is then pushed as one commit (or PR).
    """
    t0 = time.perf_counter()
    config.validate()
    out_str = output_dir if output_dir is not None else config.output_dir
    if out_str is None:
        raise ConfigError("no output folder: set `output_dir` in the config or pass --out")
    # Everything that can be checked without reading a tensor is checked first.
    out = check_output_dir(out_str, config.overwrite, inputs=_inputs(config))
    method = method_instance if method_instance is not None else build_method(config.method, config.parameters)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch.cuda.is_available() is False")
    if config.push_to_hub:
        check_push_target(config.push_to_hub)
    guard = _FiniteGuard(config.allow_non_finite)

    with terminate_as_interrupt():
        task = _open_task(config)
        ref: TensorSource | None = None
        vector: SafetyVector | None = None
        writer: BackgroundShardWriter | None = None
        try:
            ref = _open_reference(config, method, task)
            vector = SafetyVector.from_pretrained(config.safety_vector, revision=config.safety_vector_revision)
            plan = _validate_plan(config, method, task, ref, vector)
            taus = _TauSource(task, ref, device)
            get_delta = _delta_getter(vector, device, guard)
            if hasattr(method, "use_vector"):
                method.use_vector(vector)
            global_times = StageTimes()
            _global_pass(method, plan, taus, get_delta, progress, guard, global_times)
            with AtomicDir(out, config.overwrite) as atomic:
                t_pass = time.perf_counter()
                tmp = atomic.path
                times = StageTimes()
                writer = BackgroundShardWriter(StreamingShardWriter(tmp, plan.outputs, config.max_shard_size, prefix="model"),
                                               on_write=lambda s: setattr(times, "write", times.write + s))
                try:
                    for n, _spec, theta in _merged_tensors(method, plan, task, taus, get_delta, device, progress, guard, times):
                        writer.write(n, theta)
                    files = writer.close()
                except BaseException:
                    # Stop the writer thread before the temporary folder is removed (it must not
                    # write into, or recreate, a folder being cleaned up).
                    writer.abort()
                    writer = None
                    raise
                times.wall = time.perf_counter() - t_pass
                writer = None
                files += _copy_aux_files(task, config, tmp)
                summary = _summary(method)
                if guard.passed:
                    summary["non_finite_passed_through"] = len(guard.passed)
                result = MergeResult(
                    output_dir=out,
                    method=method.name,
                    summary=summary,
                    tensors=method.report,
                    num_tensors=len(plan.names),
                    num_merged=len(plan.merged),
                    seconds=time.perf_counter() - t0,
                    files=files,
                    timing={"global_pass": global_times.as_dict(), "merge_pass": times.as_dict()}
                    if method.wants_global_pass() else {"merge_pass": times.as_dict()},
                )
                report = {
                    "method": method.name,
                    "parameters": _jsonable(vars(method.params)),
                    "summary": _jsonable(summary),
                    "non_finite": guard.passed,
                    "tensors": _jsonable(method.report),
                    "task_model": task.display,
                    "task_reference": ref.display if ref is not None else None,
                    "safety_vector": vector.source.display,
                    "safety_vector_config": {k: v for k, v in vars(vector.config).items() if k != "tensor_norms"},
                    "timing": result.timing,
                }
                (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
                config.save_pretrained(tmp)
                card_sink().merged_model_card(config, result, task_display=task.display, vector=vector).save(tmp / "README.md")
                result.files += [REPORT_NAME, "safety_merge_config.yaml", "README.md"]
                if finalize is not None:
                    result.files += finalize(tmp)
                atomic.commit()
        finally:
            if writer is not None:
                writer.abort()
            task.close()
            if ref is not None and ref is not getattr(task, "base", None):
                ref.close()
            if vector is not None:
                vector.close()
    if config.push_to_hub:
        from ..io.hub import push_folder

        info = push_folder(out, config.push_to_hub, private=config.private, create_pr=config.create_pr,
                           commit_message=config.commit_message)
        result.commit_url = str(getattr(info, "commit_url", "") or "")
        result.pr_url = getattr(info, "pr_url", None)
    result.seconds = time.perf_counter() - t0
    return result


def _inputs(config: SafetyMergeConfig) -> list[str | None]:
    return [config.task_model, config.task_adapter, config.task_reference, config.safety_vector]


def apply_safety_vector(
    model: Any,
    vector: SafetyVector | str,
    *,
    method: str = "enchtable",
    parameters: dict[str, Any] | None = None,
    task_reference: str | None = None,
    task_reference_revision: str | None = None,
    vector_revision: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    allow_non_finite: bool = False,
) -> MergeResult:
    """Patch an in-memory transformers model with a safety vector, in place.

    Runs exactly the computation of `merge` (same plan checks, same global pass, same
    per-tensor formulas and casts), so the result equals the on-disk merge bit for bit.
    Atomic: every merged tensor is computed and checked (finite, right shape) before the first
    one is copied into the model, so on any error the model is unchanged. This holds a copy of
    the patched tensors (the safety vector's coverage) while it runs.
    """
    from ..io.checkpoints import InMemorySource

    t0 = time.perf_counter()
    m = build_method(method, parameters)
    cfg = SafetyMergeConfig(task_model=getattr(model.config, "_name_or_path", None) or model.__class__.__name__,
                            safety_vector="<in memory>" if isinstance(vector, SafetyVector) else vector,
                            task_reference=task_reference, method=method, parameters=dict(parameters or {}),
                            device=device, allow_non_finite=allow_non_finite)
    vec = vector if isinstance(vector, SafetyVector) else SafetyVector.from_pretrained(vector, revision=vector_revision)
    # The tensors a checkpoint would hold: state_dict minus tied duplicates (kept: first name).
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            continue
        seen[ptr] = name
        tensors[name] = t
    task = InMemorySource(tensors, display=cfg.task_model, config=model.config.to_dict())
    ref = open_checkpoint(task_reference, revision=task_reference_revision) if (m.needs_reference and task_reference) else None
    guard = _FiniteGuard(allow_non_finite)
    staged: dict[str, torch.Tensor] = {}
    try:
        plan = _validate_plan(cfg, m, task, ref, vec)
        dev = torch.device(device)
        taus = _TauSource(task, ref, dev)
        get_delta = _delta_getter(vec, dev, guard)
        if hasattr(m, "use_vector"):
            m.use_vector(vec)
        _global_pass(m, plan, taus, get_delta, progress, guard)
        merged_names = [n for n in plan.names if n in plan.merged]
        sub_plan = _Plan(names=merged_names, merged=plan.merged,
                         outputs=[o for o in plan.outputs if o.name in plan.merged])
        with torch.no_grad():
            for n, _spec, theta in _merged_tensors(m, sub_plan, task, taus, get_delta, dev, progress, guard):
                staged[n] = theta.to(tensors[n].device, tensors[n].dtype)
            # Everything is computed and checked: only now is the model touched.
            for n, theta in staged.items():
                tensors[n].copy_(theta)
    finally:
        staged.clear()
        if ref is not None:
            ref.close()
        if not isinstance(vector, SafetyVector):
            vec.close()
    summary = _summary(m)
    if guard.passed:
        summary["non_finite_passed_through"] = len(guard.passed)
    return MergeResult(output_dir=Path("."), method=m.name, summary=summary, tensors=m.report,
                       num_tensors=len(tensors), num_merged=len(plan.merged), seconds=time.perf_counter() - t0)


def _tag_dtype(tag: str) -> torch.dtype:
    from ..io.safetensors_stream import DTYPE_TAGS

    return DTYPE_TAGS[tag]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    return str(x)
