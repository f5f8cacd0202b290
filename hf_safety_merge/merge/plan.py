"""The merge plan: open the inputs (task model or base + LoRA, reference, safety vector), check
every tensor's name, shape and dtype from headers before a weight is read, and serve tau =
theta_task - theta_ref per tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, PlanError
from ..io.checkpoints import LoraCheckpoint, SafetensorsCheckpoint, TensorSource
from ..io.hub import open_checkpoint, resolve_checkpoint
from ..io.safetensors_stream import (
    TORCH_TO_TAG,
    OutputTensor,
)
from ..methods.base import MergeMethod
from ..methods.finite import FiniteGuard, is_finite
from ..vectors import SafetyVector
from .config import SafetyMergeConfig

_OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}


@dataclass
class Plan:
    names: list[str]  # output tensors, in read order
    merged: set[str]  # names covered by the safety vector
    outputs: list[OutputTensor]
    #: tensors left as the task model has them because of a shape mismatch (on_shape_mismatch:
    #: skip), with the reason; they take part in no statistic either
    skipped: dict[str, str] = field(default_factory=dict)


def _arch(cfg: dict[str, Any] | None) -> str | None:
    if not cfg:
        return None
    archs = cfg.get("architectures") or []
    return archs[0] if archs else None


def open_task(cfg: SafetyMergeConfig) -> TensorSource:
    base = open_checkpoint(cfg.task_model, revision=cfg.task_model_revision, allow_pickle=cfg.allow_pickle)
    if cfg.task_adapter is None:
        return base
    adapter_dir, display = resolve_checkpoint(
        cfg.task_adapter, revision=cfg.task_adapter_revision, prefix="adapter_model", extra_patterns=["adapter_config.json"]
    )
    return LoraCheckpoint(base, adapter_dir, display=f"{base.display} + LoRA {display}")


def _read_order(src: TensorSource) -> list[str]:
    if isinstance(src, SafetensorsCheckpoint):
        return sorted(src.keys(), key=lambda n: (str(src.info(n).file), src.info(n).start))
    if isinstance(src, LoraCheckpoint):
        return _read_order(src.base)
    return src.keys()


def validate_plan(
    cfg: SafetyMergeConfig,
    method: MergeMethod,
    task: TensorSource,
    ref: TensorSource | None,
    vector: SafetyVector,
) -> Plan:
    task_cfg = task.config or {}
    task_arch, vec_arch = _arch(task_cfg), vector.config.architecture
    if task_arch and vec_arch and task_arch != vec_arch:
        raise PlanError(
            f"architecture mismatch: the task model {task.display} is {task_arch} but the safety vector "
            f"{vector.source.display} was computed on {vec_arch}"
        )
    if ref is not None:
        ref_arch = _arch(ref.config)
        if task_arch and ref_arch and task_arch != ref_arch:
            raise PlanError(f"architecture mismatch: task model is {task_arch}, reference {ref.display} is {ref_arch}")
    task_keys = set(task.keys())
    tied = bool(task_cfg.get("tie_word_embeddings", False))
    skip = getattr(cfg, "on_shape_mismatch", "error") == "skip"
    skipped: dict[str, str] = {}
    for n in vector:
        vm = vector.meta(n)
        if vm.dtype not in _FLOAT_TAGS:
            raise PlanError(f"safety vector tensor {n!r} has dtype {vm.dtype}; expected a floating dtype")
        if n not in task_keys:
            if tied and "lm_head" in n:
                raise PlanError(
                    f"safety vector has {n!r} but the task model {task.display} ties its output embedding to the "
                    "input embedding (tie_word_embeddings=true) and stores no such tensor; recompute the vector "
                    "without lm_head (e.g. exclude: ['lm_head'])"
                )
            raise PlanError(
                f"safety vector tensor {n!r} ({vector.source.where(n)}) is missing from the task model {task.display}"
            )
        tm = task.meta(n)
        if tm.shape != vm.shape and skip:
            skipped[n] = f"shape {list(tm.shape)} in the task model, {list(vm.shape)} in the safety vector"
            continue
        if tm.shape != vm.shape:
            hint = ""
            if len(tm.shape) == 2 and tm.shape[1] == vm.shape[1] and tm.shape[0] != vm.shape[0] and (
                "embed" in n or "lm_head" in n or "wte" in n
            ):
                hint = f": vocabulary sizes differ ({tm.shape[0]} vs {vm.shape[0]}); did the fine-tune add tokens?"
            raise PlanError(
                f"shape mismatch for {n!r}: task model {list(tm.shape)} ({task.where(n)}) vs safety vector "
                f"{list(vm.shape)} ({vector.source.where(n)}){hint}; on_shape_mismatch: skip keeps the task's weights there"
            )
    if method.needs_reference:
        if ref is None:
            raise ConfigError(
                f"method {method.name!r} needs the task model's pre-fine-tuning reference to compute "
                "tau = theta_task - theta_ref: set `task_reference` in the config (or give a LoRA `task_adapter`)"
            )
        needed = task.keys() if method.global_pass_all_tensors else vector.keys()
        ref_keys = set(ref.keys())
        for n in needed:
            if n not in ref_keys:
                raise PlanError(f"tensor {n!r} of the task model ({task.where(n)}) is missing from the reference {ref.display}")
            if ref.meta(n).shape != task.meta(n).shape:
                if skip:
                    skipped.setdefault(n, f"shape {list(task.meta(n).shape)} in the task model, "
                                          f"{list(ref.meta(n).shape)} in the reference")
                    continue
                raise PlanError(
                    f"shape mismatch for {n!r}: task model {list(task.meta(n).shape)} ({task.where(n)}) vs reference "
                    f"{list(ref.meta(n).shape)} ({ref.where(n)}); on_shape_mismatch: skip keeps the task's weights there"
                )
    names = _read_order(task)
    out_dtype = _OUT_DTYPES.get(cfg.dtype)
    outputs = []
    for n in names:
        m = task.meta(n)
        tag = TORCH_TO_TAG[out_dtype] if out_dtype is not None and m.dtype in _FLOAT_TAGS else m.dtype
        outputs.append(OutputTensor(n, tag, m.shape))
    return Plan(names=names, merged=set(vector.keys()) - set(skipped), outputs=outputs, skipped=skipped)


class TauSource:
    """tau = theta_task - theta_ref per tensor; for a LoRA task with its base as reference,
    tau is the LoRA update itself (exact, no base weights read, zero where LoRA is absent)."""

    def __init__(self, task: TensorSource, ref: TensorSource | None, device: torch.device) -> None:
        self.task, self.ref, self.device = task, ref, device
        self.lora_direct = isinstance(task, LoraCheckpoint) and ref is not None and _same_source(task.base, ref)

    def fetch(self, name: str) -> torch.Tensor | None:
        """Read what tau needs besides theta_task (the reference tensor, or the LoRA update)."""
        if self.ref is None:
            return None
        if self.lora_direct:
            assert isinstance(self.task, LoraCheckpoint)
            d = self.task.delta(name)
            return d if d is not None else torch.zeros(self.task.meta(name).shape, dtype=torch.float32)
        return self.ref.view(name)  # only read (tau = task - reference is a new tensor)

    def tau_from(self, theta32: torch.Tensor | None, fetched: torch.Tensor | None, name: str) -> torch.Tensor | None:
        if self.ref is None or fetched is None:
            return None
        if self.lora_direct:
            return fetched.to(self.device, torch.float32)
        t = theta32 if theta32 is not None else self.task.get(name).to(self.device, torch.float32)
        return t - fetched.to(self.device, torch.float32)

    def tau(self, name: str, theta_task: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.tau_from(theta_task, self.fetch(name), name)


def _same_source(a: TensorSource, b: TensorSource) -> bool:
    if a is b:
        return True
    from ..io.hub import HubCheckpoint

    if isinstance(a, HubCheckpoint) and isinstance(b, HubCheckpoint):
        return a.repo_id == b.repo_id and a.commit == b.commit
    return a.path is not None and b.path is not None and a.path.resolve() == b.path.resolve()


def open_reference(config: SafetyMergeConfig, method: MergeMethod, task: TensorSource) -> TensorSource | None:
    if not (method.needs_reference and config.reference is not None):
        return None
    if config.task_adapter is not None and config.task_reference is None:
        assert isinstance(task, LoraCheckpoint)
        return task.base
    assert config.reference is not None
    return open_checkpoint(config.reference, revision=config.task_reference_revision, allow_pickle=config.allow_pickle)


def delta_getter(vector: SafetyVector, device: torch.device, guard: FiniteGuard) -> Any:
    def get_delta(name: str) -> torch.Tensor:
        d = vector.source.view(name).to(device, torch.float32)  # only read: a memory map where possible
        if not is_finite(d):
            guard.fail(f"safety vector tensor {name!r} ({vector.source.where(name)}) holds NaN/Inf values; recompute the vector")
        return d

    setattr(get_delta, "source", vector.source)  # noqa: B010  (the pipeline asks whether reads may run in parallel)
    return get_delta
