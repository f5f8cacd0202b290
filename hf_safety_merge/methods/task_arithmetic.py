"""Task arithmetic (RESTA): `theta = theta_task + beta * Delta_s`."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import torch
from pydantic import Field

from .base import MergeMethod, MethodParams, register


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
    Params = TaskArithmeticParams
    needs_reference = False
    params: TaskArithmeticParams

    def merge_tensor(self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        if self.theta_owned:
            return theta_task.add_(delta, alpha=self.params.beta)
        return torch.add(theta_task, delta, alpha=self.params.beta)
