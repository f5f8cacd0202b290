"""What a merge did (`MergeResult`), its summary lines, and the JSON form of its report.

Layer 4 (docs/architecture.md): used by the engine (`merge.engine`) and the in-memory merge
(`merge.apply`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..methods.base import MergeMethod
from .passes import patch_survival_summary

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

def merge_summary(method: MergeMethod) -> dict[str, Any]:
    summary = method.summary()
    ws = [r["w"] for r in method.report.values() if "w" in r]
    if ws:
        summary.update({"w_mean": sum(ws) / len(ws), "w_min": min(ws), "w_max": max(ws)})
    return summary

def note_survival(method: MergeMethod, summary: dict[str, Any]) -> dict[str, Any] | None:
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


def skipped_text(skipped: dict[str, str]) -> str:
    names = sorted(skipped)
    shown = "; ".join(f"`{n}` ({skipped[n]})" for n in names[:5])
    return f"{len(names)} tensor(s) kept as in the task model (on_shape_mismatch: skip): {shown}" + (" ..." if len(names) > 5 else "")



def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, bool | int | float | str) or x is None:
        return x
    return str(x)
