"""Task arithmetic (RESTA): `theta = theta_task + beta * Delta_s`.

Layer 2 (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import torch
from pydantic import Field

from .base import Knob, MergeMethod, MethodParams, register


@dataclasses.dataclass
class TaskArithmeticParams(MethodParams):
    """RESTA: theta = theta_task + beta * Delta_s (Bhardwaj et al. 2024; their scripts use 1.0).

    Attributes:
        beta: the safety vector's scale, in (0, 10].
    """

    beta: Annotated[float, Field(gt=0, le=10)] = 1.0


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    label = "RESTA"
    Params = TaskArithmeticParams
    aliases = ("resta",)
    reference = "RESTA (Bhardwaj et al. 2024, arXiv 2402.11746): task arithmetic with the safety vector"
    card_text = "Task arithmetic (RESTA): `theta = theta_task + beta * Delta_s`."
    scale = ("beta", 0.05, 2.0)
    mergekit_names = {"task_arithmetic": {}}
    mergekit_model_parameters = {"vector.weight": "beta"}  # theta = theta_task + weight * Delta_s
    description = "**Task arithmetic (RESTA)**: `θ_task + β·Δs`. Simple and fast; no reference needed."
    knobs = {"beta": Knob("β: scale of the safety vector", 0.0, 3.0, 0.05)}
    toy_parameters = {"beta": 1.0}
    needs_reference = False
    params: TaskArithmeticParams

    def merge_tensor(self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        if self.theta_owned:
            return theta_task.add_(delta, alpha=self.params.beta)
        return torch.add(theta_task, delta, alpha=self.params.beta)
