"""Safe LoRA: `theta = theta_ref + C tau` where `cos(C tau, tau)` is low, `C = V V^T / ||V||_F`."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..validation import NonNegativeInt
from .base import Knob, MergeMethod, MethodParams, register


def safe_lora_project(tau: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`C tau` with `C = V V^T / ||V||_F` (Safe LoRA, Eq. 2; IBM/SafeLoRA `torch.norm(vec)`),
    computed as `V (V^T tau) / ||V||_F`, never forming the d x d matrix C."""
    nv = torch.linalg.vector_norm(v)
    if nv == 0:
        return torch.zeros_like(tau)
    return (v @ (v.T @ tau)) / nv


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if na == 0 or nb == 0:
        return 1.0
    return float((a.flatten().double() @ b.flatten().double()) / (na.double() * nb.double()))


@dataclasses.dataclass
class SafeLoraParams(MethodParams):
    """Safe LoRA (Hsu et al. 2024) on full fine-tuning updates.

    The safety vector plays the alignment matrix `V = W_aligned - W_base`. For each covered
    matrix the update `tau` is projected, `C tau`, and the projection is kept where the cosine
    similarity between `C tau` and `tau` is at most the threshold. Defaults follow IBM/SafeLoRA's
    `SafeLoRAConfig`: select "number" of layers 10 (the lowest similarities), threshold 0.5.

    Attributes:
        select: 'number': project the num_proj_layers matrices whose cosine(C tau, tau) is lowest;
            'threshold': project every matrix with cosine <= threshold.
        threshold: cosine threshold for select='threshold'.
        num_proj_layers: how many matrices are projected with select='number'.
    """

    select: Literal["number", "threshold"] = "number"
    threshold: Annotated[float, Field(ge=-1, le=1)] = 0.5
    num_proj_layers: NonNegativeInt = 10


@register
class SafeLora(MergeMethod):
    name = "safe_lora"
    label = "Safe LoRA"
    vector_kind = "alignment"
    Params = SafeLoraParams
    reference = "Safe LoRA (Hsu et al. 2024, arXiv 2405.16833); defaults from IBM/SafeLoRA's `SafeLoRAConfig`"
    card_text = ("Safe LoRA projection: the fine-tuning update of the least aligned matrices is projected onto "
                 "the alignment subspace `C = V V^T / ||V||_F`.")
    scale = ("num_proj_layers", 0, -1)  # -1: every matrix the vector covers
    mergekit_names = {"safe_lora": {}}
    description = ("**Safe LoRA**: projects the task update `τ` onto the safety subspace of `Δs` for the "
               "matrices where they disagree most.")
    knobs = {"select": Knob("select projected matrices by"),
             "threshold": Knob("cosine threshold (select = threshold)", 0.0, 1.0, 0.01),
             "num_proj_layers": Knob("number of projected matrices (select = number)", 0, 200, 1)}
    needs_reference = True
    needs_global_pass = True
    params: SafeLoraParams

    def __init__(self, params: MethodParams) -> None:
        super().__init__(params)
        self.cosines: dict[str, float] = {}
        self.threshold_used: float | None = None

    def observe(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor | None) -> None:
        if self.params.select == "number" and tau is not None and delta is not None and delta.ndim == 2:
            self.cosines[name] = _cosine(safe_lora_project(tau, delta), tau)

    def finish_global(self) -> None:
        if self.params.select == "number":
            vals = sorted(self.cosines.values())
            k = min(self.params.num_proj_layers, len(vals))
            # IBM/SafeLoRA: thrs = sort(cos)[:num_proj_layers][-1], then project cos <= thrs.
            self.threshold_used = vals[k - 1] if k > 0 else -math.inf
        else:
            self.threshold_used = self.params.threshold

    def wants_global_pass(self) -> bool:
        return self.params.select == "number"

    def summary(self) -> dict[str, Any]:
        return {"threshold_used": self.threshold_used, "projected": sum(1 for r in self.report.values() if r.get("projected"))}

    def merge_tensor(self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        assert tau is not None
        if self.threshold_used is None:
            self.finish_global()
        if delta.ndim != 2:
            self.report[name] = {"projected": False, "reason": "not a matrix"}
            return theta_task
        proj = safe_lora_project(tau, delta)
        cos = self.cosines.get(name)
        if cos is None:
            cos = _cosine(proj, tau)
        assert self.threshold_used is not None
        projected = cos <= self.threshold_used
        self.report[name] = {"cosine": cos, "projected": projected}
        if projected:
            # theta_ref + C tau == theta_task - tau + C tau
            return theta_task - tau + proj
        return theta_task
