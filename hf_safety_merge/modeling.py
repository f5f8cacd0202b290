"""`from_pretrained`-style loading of safety-patched models, and `model.load_safety_vector`.

Layer 4 (docs/architecture.md): may import the merge engine, `vectors`, `config`.
"""

from __future__ import annotations

import os
import types
from typing import Any

from .merge import MergeResult, apply_safety_vector
from .merge.config import SafetyMergeConfig
from .vectors import SafetyVector


def load_safety_vector(
    model: Any,
    safety_vector: SafetyVector | str | os.PathLike[str],
    merge_config: SafetyMergeConfig | str | os.PathLike[str] | None = None,
    *,
    method: str | None = None,
    parameters: dict[str, Any] | None = None,
    task_reference: str | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge a safety vector into `model` in place, like `load_adapter` for adapters.

    `merge_config` (a `SafetyMergeConfig`, or a path to one) supplies the method, its
    parameters, the task reference and the revisions; explicit keyword arguments override it
    (`revision` is the safety vector's revision; default `merge_config.safety_vector_revision`).
    When no task reference is given and the method needs one, the vector's own recorded
    `aligned_model` (at its `aligned_revision`) is used, as `PeftModel.from_pretrained` uses
    the adapter's own config.
    """
    from .merge import get_method_class

    cfg: SafetyMergeConfig | None
    if merge_config is None or isinstance(merge_config, SafetyMergeConfig):
        cfg = merge_config
    else:
        cfg = SafetyMergeConfig.from_pretrained(merge_config)
    m = method or (cfg.method if cfg else "enchtable")
    params = parameters if parameters is not None else (dict(cfg.parameters) if cfg else {})
    ref = task_reference if task_reference is not None else (cfg.reference if cfg else None)
    ref_revision = cfg.task_reference_revision if cfg else None
    vec_revision = revision if revision is not None else (cfg.safety_vector_revision if cfg else None)
    vec = safety_vector if isinstance(safety_vector, SafetyVector) else SafetyVector.from_pretrained(
        str(safety_vector), revision=vec_revision)
    if ref is None and get_method_class(m).needs_reference and vec.config.aligned_model:
        ref, ref_revision = vec.config.aligned_model, vec.config.aligned_revision
    result = apply_safety_vector(
        model, vec, method=m, parameters=params, task_reference=ref,
        task_reference_revision=ref_revision,
        vector_revision=vec_revision, device=cfg.device if cfg else "cpu", progress=progress,
    )
    model.safety_merge_result = result
    return result


def _same_ref(a: str, b: str) -> bool:
    from pathlib import Path

    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


class SafetyVectorMixin:
    """Mix into a `PreTrainedModel` subclass to get `model.load_safety_vector(...)`."""

    def load_safety_vector(self, safety_vector: SafetyVector | str, merge_config: Any = None, **kwargs: Any) -> MergeResult:
        return load_safety_vector(self, safety_vector, merge_config, **kwargs)


def add_safety_vector_support(model: Any) -> Any:
    """Give an existing model instance a bound `load_safety_vector` method (class unchanged, so
    `save_pretrained` still records the original architecture)."""
    model.load_safety_vector = types.MethodType(SafetyVectorMixin.load_safety_vector, model)
    return model


class AutoSafeModelForCausalLM:
    """`AutoModelForCausalLM` plus a safety patch applied in memory.

    Example:
        # the vector's recorded aligned model is the task reference by default
        model = AutoSafeModelForCausalLM.from_pretrained("org/my-finetune", safety_vector="org/llama-safety-vector")
        # or everything from a merge config (task model, revisions, method and parameters)
        model = AutoSafeModelForCausalLM.from_pretrained(merge_config="patched/safety_merge_config.yaml")
    """

    def __init__(self) -> None:
        raise OSError("use AutoSafeModelForCausalLM.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str] | None = None,
        *model_args: Any,
        safety_vector: SafetyVector | str | None = None,
        merge_config: SafetyMergeConfig | str | os.PathLike[str] | None = None,
        method: str | None = None,
        parameters: dict[str, Any] | None = None,
        task_reference: str | None = None,
        safety_vector_revision: str | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Load with `AutoModelForCausalLM.from_pretrained(...)` (all its arguments pass through;
        `trust_remote_code` is never set for you), then merge the safety vector in place.

        The model defaults to `merge_config.task_model` (at `task_model_revision` unless
        `revision=` is given); the vector's revision to `merge_config.safety_vector_revision`;
        the task reference to the vector's recorded `aligned_model`.
        """
        from transformers import AutoModelForCausalLM

        from .errors import ConfigError

        cfg = merge_config
        if cfg is not None and not isinstance(cfg, SafetyMergeConfig):
            cfg = SafetyMergeConfig.from_pretrained(cfg)
        if cfg is not None:
            if pretrained_model_name_or_path is None:
                pretrained_model_name_or_path = cfg.task_model
            elif not _same_ref(os.fspath(pretrained_model_name_or_path), cfg.task_model):
                raise ConfigError(
                    f"AutoSafeModelForCausalLM.from_pretrained: the model {os.fspath(pretrained_model_name_or_path)!r} "
                    f"is not merge_config.task_model {cfg.task_model!r}; pass one of them (or make them agree)")
            if cfg.task_adapter is not None:
                raise ConfigError("AutoSafeModelForCausalLM.from_pretrained: merge_config.task_adapter is set; load the "
                                  "adapter with peft (PeftModel.from_pretrained(...).merge_and_unload()) and call "
                                  "add_safety_vector_support(model).load_safety_vector(...), or use merge()")
            if cfg.task_model_revision and "revision" not in kwargs:
                kwargs["revision"] = cfg.task_model_revision
        if pretrained_model_name_or_path is None:
            raise ValueError("AutoSafeModelForCausalLM.from_pretrained needs the task model (or a merge_config naming it)")
        vec = safety_vector if safety_vector is not None else (cfg.safety_vector if cfg else None)
        if vec is None:
            raise ValueError("AutoSafeModelForCausalLM.from_pretrained needs `safety_vector=` (or a merge_config naming one)")
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        add_safety_vector_support(model)
        load_safety_vector(model, vec, cfg, method=method, parameters=parameters, task_reference=task_reference,
                           revision=safety_vector_revision, progress=progress)
        return model
