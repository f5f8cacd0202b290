"""The streaming merge engine.

sources (task model or base + LoRA, reference, safety vector) -> plan (validated from headers
alone) -> optional global pass (norms, cosines) -> per-tensor merge -> sharded writer -> model
folder (weights, config, tokenizer, card, report), written to a temporary folder and renamed at
the end so that a failed merge leaves nothing behind.

The plan and the inputs live in `merge.plan`, the two passes in `merge.passes`, the streaming
pipeline (read-ahead, worker pool, stage times) in `merge.pipeline`, the file records and
`--verify` in `merge.provenance`, the result in `merge.result`, the NaN/Inf guard in
`methods.finite`; this module writes the folder (`merge`). `merge.apply` patches a model in
memory with the same computation (`apply_safety_vector`).

Layer 4 (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io.checkpoints import LoraCheckpoint, TensorSource
from ..io.hub import AUX_PATTERNS, check_push_target
from ..io.output import (
    AtomicDir,
    OutputLock,
    check_free_space,
    check_output_dir,
    terminate_as_interrupt,
)
from ..io.safetensors_stream import (
    BackgroundShardWriter,
    StreamingShardWriter,
)
from ..io.sink import card_sink, prepare_in_background
from ..methods.base import MergeMethod, build_method
from ..methods.finite import FiniteGuard
from ..vectors import SafetyVector
from . import provenance
from .config import SafetyMergeConfig
from .passes import _global_pass, _merged_tensors, merge_pool
from .pipeline import StageTimes
from .plan import Plan, TauSource, delta_getter, open_reference, open_task, validate_plan
from .provenance import REPORT_NAME
from .result import MergeResult, jsonable, merge_summary, note_survival, skipped_text

logger = logging.getLogger("hf_safety_merge")


def _aux_files(task: TensorSource) -> list[tuple[str, Path]]:
    """The tokenizer/config files the output gets from the task model: (name, source file)."""
    found: list[tuple[str, Path]] = []
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
                found.append((name, src))
                break
    return found


def _copy_aux_files(task: TensorSource, cfg: SafetyMergeConfig, out: Path) -> list[str]:
    copied: list[str] = []
    for name, src in _aux_files(task):
        shutil.copyfile(src, out / name)
        copied.append(name)
    cfg_file = out / "config.json"
    if cfg_file.is_file() and cfg.dtype != "auto":
        data = json.loads(cfg_file.read_text())
        data["dtype"] = cfg.dtype
        data.pop("torch_dtype", None)
        cfg_file.write_text(json.dumps(data, indent=2) + "\n")
    return copied


def _bytes_to_write(plan: Plan, task: TensorSource) -> int:
    """What the output folder will take, from the plan alone: every output tensor, its header
    entry and the copied tokenizer/config files (the card, config and report fall in the margin
    `check_free_space` keeps)."""
    tensors = sum(o.nbytes for o in plan.outputs)
    headers = sum(len(o.name) + 100 for o in plan.outputs)
    aux = 0
    for _name, src in _aux_files(task):
        with contextlib.suppress(OSError):
            aux += src.stat().st_size
    return tensors + headers + aux


def merge(
    config: SafetyMergeConfig,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    finalize: Callable[[Path], list[str]] | None = None,
    method_instance: MergeMethod | None = None,
    verify: str | Path | None = None,
    hash_inputs: bool = False,
) -> MergeResult:
    """Merge a safety vector into a fine-tuned model as `config` says and write the result.

    `finalize(folder)` may add files to the finished folder before it is moved into place (it
    returns their names); calibration uses it for its card section and plot, and passes
    `method_instance` (the configured method with the per-matrix weights it already computed).

    Every input is validated from headers (names, shapes, dtypes, architecture, vocabulary,
    tied embeddings) before a weight is read (for Hub repos: before a weight is downloaded);
    the model is streamed tensor by tensor, so peak memory is a few tensors regardless of model
    or shard size. With `config.push_to_hub`, the folder is then pushed as one commit (or PR).

    One merge at a time writes an output folder (a lock beside it; a second one fails at once,
    naming the first one's pid); the free space is checked against the plan before any tensor
    is computed. `merge_report.json` records every output file's sha256 and every input file;
    with `hash_inputs` (or `verify`), the inputs' sha256 too. With `verify` (a previous merge's
    `merge_report.json`, or its folder), the local input files are hashed first and the merge is
    refused (`IntegrityError`, naming the file) when one differs from what that report recorded.
    """
    t0 = time.perf_counter()
    config.validate()
    out_str = output_dir if output_dir is not None else config.output_dir
    if out_str is None:
        raise ConfigError("no output folder: set `output_dir` in the config or pass --out")
    # Everything that can be checked without reading a tensor is checked first.
    out = check_output_dir(out_str, config.overwrite, inputs=_inputs(config))
    with OutputLock(out):
        manifest = provenance.load_manifest(verify) if verify is not None else None
        method = method_instance if method_instance is not None else build_method(config.method, config.parameters)
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but torch.cuda.is_available() is False")
        if config.push_to_hub:
            check_push_target(config.push_to_hub)
        result = _merge_locked(config, out, method, device, progress, finalize, manifest,
                               hash_inputs or manifest is not None, t0)
        if config.push_to_hub:
            from ..io.hub import push_folder

            info = push_folder(out, config.push_to_hub, private=config.private, create_pr=config.create_pr,
                               commit_message=config.commit_message)
            result.commit_url = str(getattr(info, "commit_url", "") or "")
            result.pr_url = getattr(info, "pr_url", None)
    result.seconds = time.perf_counter() - t0
    return result


def _merge_locked(
    config: SafetyMergeConfig,
    out: Path,
    method: MergeMethod,
    device: torch.device,
    progress: bool,
    finalize: Callable[[Path], list[str]] | None,
    manifest: tuple[Path, list[dict[str, Any]]] | None,
    hash_inputs: bool,
    t0: float,
) -> MergeResult:
    guard = FiniteGuard(config.allow_non_finite)
    with terminate_as_interrupt():
        task = open_task(config)
        ref: TensorSource | None = None
        vector: SafetyVector | None = None
        writer: BackgroundShardWriter | None = None
        card_prep = prepare_in_background()
        try:
            ref = open_reference(config, method, task)
            vector = SafetyVector.from_pretrained(config.safety_vector, revision=config.safety_vector_revision)
            plan = validate_plan(config, method, task, ref, vector)
            # Before any tensor is computed: room for the output, and (when asked) the inputs'
            # bytes are those a previous merge recorded.
            check_free_space(out, _bytes_to_write(plan, task), "output folder")
            inputs = provenance.input_records(config, task, ref, vector)
            if hash_inputs:
                provenance.hash_inputs(inputs)
            if manifest is not None:
                provenance.check_recorded_inputs(inputs, *manifest)
            taus = TauSource(task, ref, device)
            get_delta = delta_getter(vector, device, guard)
            method.use_vector(vector)
            global_times = StageTimes()
            non_finite_tau = _global_pass(method, plan, taus, get_delta, progress, guard, global_times)
            with AtomicDir(out, config.overwrite) as atomic:
                t_pass = time.perf_counter()
                tmp = atomic.path
                times = StageTimes()
                pool = merge_pool(plan, task, device)
                shards = StreamingShardWriter(tmp, plan.outputs, config.max_shard_size, prefix="model")
                hasher = provenance.ShardHasher(shards, pool.give if pool is not None else None)
                writer = BackgroundShardWriter(shards, on_write=lambda s: setattr(times, "write", times.write + s),
                                               release=hasher.written)
                try:
                    for n, _spec, theta in _merged_tensors(method, plan, task, taus, get_delta, device, progress, guard, times,
                                                           non_finite_tau=non_finite_tau, pool=pool):
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
                summary = merge_summary(method)
                if guard.passed:
                    summary["non_finite_passed_through"] = len(guard.passed)
                survival = note_survival(method, summary)
                if plan.skipped:
                    summary["shape_mismatch_skipped"] = skipped_text(plan.skipped)
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
                    "parameters": jsonable(vars(method.params)),
                    "summary": jsonable(summary),
                    "non_finite": guard.passed,
                    "patch_survival": survival,
                    "shape_mismatch_skipped": plan.skipped,
                    "tensors": jsonable(method.report),
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
                provenance.record_files(tmp, inputs, hasher.digests())
                atomic.commit()
        finally:
            if writer is not None:
                writer.abort()
            if card_prep is not None:
                card_prep.join()
            task.close()
            if ref is not None and ref is not getattr(task, "base", None):
                ref.close()
            if vector is not None:
                vector.close()
    return result


def _inputs(config: SafetyMergeConfig) -> list[str | None]:
    return [config.task_model, config.task_adapter, config.task_reference, config.safety_vector]


