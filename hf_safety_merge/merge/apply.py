"""`apply_safety_vector`: the merge of `merge.engine`, applied to a transformers model in memory.

Layer 4 (docs/architecture.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..io.hub import open_checkpoint
from ..methods.base import build_method
from ..methods.finite import FiniteGuard
from ..vectors import SafetyVector
from .config import SafetyMergeConfig
from .passes import _global_pass, _merged_tensors
from .plan import Plan, TauSource, delta_getter, validate_plan
from .result import MergeResult, merge_summary, note_survival, skipped_text


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
    guard = FiniteGuard(allow_non_finite)
    staged: dict[str, torch.Tensor] = {}
    try:
        plan = validate_plan(cfg, m, task, ref, vec)
        dev = torch.device(device)
        taus = TauSource(task, ref, dev)
        get_delta = delta_getter(vec, dev, guard)
        m.use_vector(vec)
        non_finite_tau = _global_pass(m, plan, taus, get_delta, progress, guard)
        merged_names = [n for n in plan.names if n in plan.merged]
        sub_plan = Plan(names=merged_names, merged=plan.merged,
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
    summary = merge_summary(m)
    if guard.passed:
        summary["non_finite_passed_through"] = len(guard.passed)
    note_survival(m, summary)
    if plan.skipped:
        summary["shape_mismatch_skipped"] = skipped_text(plan.skipped)
    return MergeResult(output_dir=Path("."), method=m.name, summary=summary, tensors=m.report,
                       num_tensors=len(tensors), num_merged=len(plan.merged), seconds=time.perf_counter() - t0)


