"""The streaming merge engine.

sources (task model or base + LoRA, reference, safety vector) -> plan (validated from headers
alone) -> optional global pass (norms, cosines) -> per-tensor merge -> sharded writer -> model
folder (weights, config, tokenizer, card, report), written to a temporary folder and renamed at
the end so that a failed merge leaves nothing behind.

The plan and the inputs live in `merge.plan`, the two passes in `merge.passes`, the streaming
pipeline (read-ahead, worker pool, stage times) in `merge.pipeline`, the NaN/Inf guard in
`merge.finite`; this module writes the folder (`merge`), or patches a model in memory
(`apply_safety_vector`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, IntegrityError
from ..io.checkpoints import InMemorySource, LoraCheckpoint, SafetensorsCheckpoint, TensorSource
from ..io.hub import AUX_PATTERNS, HubCheckpoint, check_push_target, open_checkpoint
from ..io.output import (
    TMP_MARKER,
    AtomicDir,
    OutputLock,
    check_free_space,
    check_output_dir,
    sha256_files,
    terminate_as_interrupt,
)
from ..io.safetensors_stream import (
    BackgroundShardWriter,
    StreamingShardWriter,
    _header_bytes,
)
from ..io.sink import card_sink, prepare_in_background
from ..methods.base import MergeMethod, build_method
from ..methods.finite import _FiniteGuard
from ..vectors import SUBSPACE_CACHE, VECTOR_CONFIG, SafetyVector
from .config import SafetyMergeConfig
from .passes import _global_pass, _merged_tensors, merge_pool, patch_survival_summary
from .pipeline import StageTimes
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


def _bytes_to_write(plan: _Plan, task: TensorSource) -> int:
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
        manifest = _load_manifest(verify) if verify is not None else None
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
    guard = _FiniteGuard(config.allow_non_finite)
    with terminate_as_interrupt():
        task = _open_task(config)
        ref: TensorSource | None = None
        vector: SafetyVector | None = None
        writer: BackgroundShardWriter | None = None
        card_prep = prepare_in_background()
        try:
            ref = _open_reference(config, method, task)
            vector = SafetyVector.from_pretrained(config.safety_vector, revision=config.safety_vector_revision)
            plan = _validate_plan(config, method, task, ref, vector)
            # Before any tensor is computed: room for the output, and (when asked) the inputs'
            # bytes are those a previous merge recorded.
            check_free_space(out, _bytes_to_write(plan, task), "output folder")
            inputs = _input_records(config, task, ref, vector)
            if hash_inputs:
                _hash_inputs(inputs)
            if manifest is not None:
                _verify_inputs(inputs, *manifest)
            taus = _TauSource(task, ref, device)
            get_delta = _delta_getter(vector, device, guard)
            if hasattr(method, "use_vector"):
                method.use_vector(vector)
            global_times = StageTimes()
            non_finite_tau = _global_pass(method, plan, taus, get_delta, progress, guard, global_times)
            with AtomicDir(out, config.overwrite) as atomic:
                t_pass = time.perf_counter()
                tmp = atomic.path
                times = StageTimes()
                pool = merge_pool(plan, task, device)
                shards = StreamingShardWriter(tmp, plan.outputs, config.max_shard_size, prefix="model")
                hasher = _ShardHasher(shards, pool.give if pool is not None else None)
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
                summary = _summary(method)
                if guard.passed:
                    summary["non_finite_passed_through"] = len(guard.passed)
                survival = _note_survival(method, summary)
                if plan.skipped:
                    summary["shape_mismatch_skipped"] = _skipped_text(plan.skipped)
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
                    "patch_survival": survival,
                    "shape_mismatch_skipped": plan.skipped,
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
                _record_files(tmp, inputs, hasher.digests())
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


# ------------------------------------------------------------------------------------------
# File records: what the merge read and wrote (merge_report.json "files"), and --verify
# ------------------------------------------------------------------------------------------

#: files beside the weights that a merge reads or copies, recorded (and verified) with them
_META_FILES = (*AUX_PATTERNS, VECTOR_CONFIG, SUBSPACE_CACHE, "adapter_config.json")


def _source_records(role: str, given: str | None, src: TensorSource) -> list[dict[str, Any]]:
    if isinstance(src, HubCheckpoint):
        return [{"role": role, "source": given, "repo": src.repo_id, "revision": src.commit, "file": f}
                for f in sorted({src.file_of(n) for n in src})]
    if isinstance(src, InMemorySource) or src.path is None:
        return []
    folder = src.path
    weights = src.files() if isinstance(src, SafetensorsCheckpoint) else sorted({Path(src.where(n)) for n in src})
    paths = [f for f in weights if f.is_file()]
    paths += sorted(folder.glob("*.index.json")) + [folder / n for n in _META_FILES if (folder / n).is_file()]
    records = []
    for f in dict.fromkeys(paths):
        try:
            name = f.relative_to(folder).as_posix()
        except ValueError:
            name = f.name
        records.append({"role": role, "source": given, "path": str(f.resolve()), "file": name, "bytes": f.stat().st_size})
    return records


def _input_records(config: SafetyMergeConfig, task: TensorSource, ref: TensorSource | None,
                   vector: SafetyVector) -> list[dict[str, Any]]:
    """One record per input file: role, the config's value, the local path (or Hub repo,
    commit and file), its size; `_hash_inputs` adds the sha256."""
    records: list[dict[str, Any]] = []
    if isinstance(task, LoraCheckpoint):
        records += _source_records("task_model", config.task_model, task.base)
        records += _source_records("task_adapter", config.task_adapter, task.adapter)
    else:
        records += _source_records("task_model", config.task_model, task)
    if ref is not None and ref is not getattr(task, "base", None):
        records += _source_records("task_reference", config.task_reference, ref)
    records += _source_records("safety_vector", config.safety_vector, vector.source)
    return records


def _hash_inputs(records: list[dict[str, Any]]) -> None:
    digests = sha256_files(r["path"] for r in records if "path" in r)
    for r in records:
        if "path" in r:
            r["sha256"] = digests[Path(r["path"])]


def _load_manifest(verify: str | Path) -> tuple[Path, list[dict[str, Any]]]:
    """The input records of a previous merge's report (a `merge_report.json` or its folder)."""
    path = Path(verify).expanduser()
    if path.is_dir():
        path = path / REPORT_NAME
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"verify: cannot read {path} ({e.strerror or e}); give a merge_report.json written with "
                          "--hash-inputs (or its folder)") from e
    except ValueError as e:
        raise ConfigError(f"verify: {path} is not valid JSON ({e})") from e
    files = data.get("files") if isinstance(data, dict) else None
    inputs = files.get("inputs") if isinstance(files, dict) else None
    recorded = [r for r in inputs or [] if isinstance(r, dict) and r.get("sha256") and r.get("role") and r.get("file")]
    if not recorded:
        raise ConfigError(f"verify: {path} records no sha256 of input files; it was written without --hash-inputs "
                          "(hash_inputs=True): run that merge again with --hash-inputs to record them")
    return path, recorded


def verify_inputs(config: SafetyMergeConfig, report: str | Path) -> int:
    """Check, without merging, that the local input files of `config` hash to what `report` (a
    previous merge's `merge_report.json`, or its folder) recorded; raises `IntegrityError`
    naming the first file that changed. Returns the number of files checked."""
    path, recorded = _load_manifest(report)
    method = build_method(config.method, config.parameters)
    task = _open_task(config)
    ref: TensorSource | None = None
    vector: SafetyVector | None = None
    try:
        ref = _open_reference(config, method, task)
        vector = SafetyVector.from_pretrained(config.safety_vector, revision=config.safety_vector_revision)
        records = _input_records(config, task, ref, vector)
        _hash_inputs(records)
        _verify_inputs(records, path, recorded)
        return sum("sha256" in r for r in records)
    finally:
        task.close()
        if ref is not None and ref is not getattr(task, "base", None):
            ref.close()
        if vector is not None:
            vector.close()


def _verify_inputs(records: list[dict[str, Any]], report: Path, recorded: list[dict[str, Any]]) -> None:
    """Refuse, naming the file, when a local input's sha256 differs from the one `report`
    recorded for the same role and file (Hub inputs are pinned by commit: not hashed here)."""
    known = {(r["role"], r["file"]): r for r in recorded}
    for r in records:
        if "sha256" not in r:
            continue
        old = known.get((r["role"], r["file"]))
        if old is None:
            raise IntegrityError(f"{r['path']}: {report} records no sha256 for the {r['role']} file {r['file']!r}; "
                                 "verify against the report of a merge of these same inputs")
        if old["sha256"] != r["sha256"]:
            raise IntegrityError(
                f"{r['path']}: sha256 {r['sha256'][:16]}... differs from {old['sha256'][:16]}... recorded in {report} "
                f"for the {r['role']} file {r['file']!r}: the file changed since that merge (corrupted on disk, or "
                "replaced); nothing was merged"
            )


class _ShardHasher:
    """The sha256 of each output shard, computed on the writer thread as its tensors are written
    (the shard's header, then each tensor's bytes, as `StreamingShardWriter` lays them out), so
    that hashing the output overlaps the merge instead of reading every file again at the end.
    `written(tensor)` is the writer's `release` callback; `release` is passed each tensor after."""

    def __init__(self, writer: StreamingShardWriter, release: Callable[[torch.Tensor], Any] | None) -> None:
        self._writer = writer
        self._order = [(i, t) for i, shard in enumerate(writer.shards) for t in shard]
        self._pos = 0
        self._hashes: dict[int, Any] = {}
        self._release = release

    def written(self, tensor: torch.Tensor) -> None:
        i, _spec = self._order[self._pos]
        h = self._hashes.get(i)
        if h is None:
            h = self._hashes[i] = hashlib.sha256(_header_bytes(self._writer.shards[i], self._writer.metadata))
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        self._pos += 1
        if self._release is not None:
            self._release(tensor)

    def digests(self) -> dict[str, str]:
        """{shard file name: sha256}, once every tensor was written (else empty: hash the files)."""
        if self._pos != len(self._order):
            return {}
        return {self._writer.files[i]: h.hexdigest() for i, h in self._hashes.items()}


def _record_files(folder: Path, inputs: list[dict[str, Any]], known: dict[str, str] | None = None) -> None:
    """Add the `files` record to the report in `folder` (after `finalize`, which may edit the
    report and the card): the inputs, and every output file's size and sha256 (`known`: those
    hashed while they were written)."""
    report_file = folder / REPORT_NAME
    outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p != report_file and p.name != TMP_MARKER)
    known = known or {}
    digests = sha256_files(p for p in outputs if p.relative_to(folder).as_posix() not in known)
    digests.update({folder / name: d for name, d in known.items()})
    report = json.loads(report_file.read_text())
    report["files"] = {
        "algorithm": "sha256",
        "inputs": inputs,
        "outputs": [{"file": p.relative_to(folder).as_posix(), "bytes": p.stat().st_size, "sha256": digests[p]}
                    for p in outputs],
    }
    report_file.write_text(json.dumps(report, indent=2) + "\n")


def _note_survival(method: MergeMethod, summary: dict[str, Any]) -> dict[str, Any] | None:
    """Put how much of the patch the output dtype kept in the summary (a line for the card), warn
    when some tensors keep under half of theirs; returns the report's record (None: float32)."""
    got = patch_survival_summary(method.report, "the output dtype")
    if got is None:
        return None
    stats, below = got
    summary["patch_survival"] = (
        f"min {stats['min']:.3f}, median {stats['median']:.3f} over {stats['tensors']} patched tensors in the "
        f"output dtype; {stats['below_half']} keep under half of their patch"
        + (f" (e.g. {below[0]}): write dtype: float32 to keep small patches" if below else "")
    )
    if below:
        logger.warning("%d of %d patched tensors keep under half of their patch in the output dtype (e.g. %s); "
                       "dtype: float32 keeps small patches (docs/merging.md)", len(below), stats["tensors"], below[0])
    return {**stats, "below_half_tensors": below}


def _skipped_text(skipped: dict[str, str]) -> str:
    names = sorted(skipped)
    shown = "; ".join(f"`{n}` ({skipped[n]})" for n in names[:5])
    return f"{len(names)} tensor(s) kept as in the task model (on_shape_mismatch: skip): {shown}" + (" ..." if len(names) > 5 else "")


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
        non_finite_tau = _global_pass(m, plan, taus, get_delta, progress, guard)
        merged_names = [n for n in plan.names if n in plan.merged]
        sub_plan = _Plan(names=merged_names, merged=plan.merged,
                         outputs=[o for o in plan.outputs if o.name in plan.merged])
        with torch.no_grad():
            for n, _spec, theta in _merged_tensors(m, sub_plan, task, taus, get_delta, dev, progress, guard,
                                                   non_finite_tau=non_finite_tau):
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
    _note_survival(m, summary)
    if plan.skipped:
        summary["shape_mismatch_skipped"] = _skipped_text(plan.skipped)
    return MergeResult(output_dir=Path("."), method=m.name, summary=summary, tensors=m.report,
                       num_tensors=len(tensors), num_merged=len(plan.merged), seconds=time.perf_counter() - t0)


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
