"""TIES and DARE: `theta = theta_ref + merge([tau, Delta_s], weights)` with peft's `merge_utils`."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import torch

from ..errors import ConfigError
from ..validation import NonNegativeFloat, NonNegativeInt, UnitInterval
from .base import MergeMethod, MethodParams, register


def _check_weights(task_weight: float, safety_weight: float) -> None:
    if safety_weight == 0:
        raise ConfigError("parameter 'safety_weight' = 0: the merge would ignore the safety vector; use a value > 0")


def _weights(task_weight: float, safety_weight: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([task_weight, safety_weight], dtype=like.dtype, device=like.device)


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little")) % (2**63)


@dataclasses.dataclass
class TiesParams(MethodParams):
    """theta = theta_ref + TIES([tau, Delta_s], weights) with `peft.utils.merge_utils.ties`.

    Attributes: task_weight, safety_weight (the two weights), density (kept fraction per
    tensor, magnitude top-k), majority_sign_method ("total" or "frequency").
    """

    task_weight: NonNegativeFloat = 1.0
    safety_weight: NonNegativeFloat = 1.0
    density: UnitInterval = 0.5
    majority_sign_method: Literal["total", "frequency"] = "total"

    def validate(self) -> None:
        _check_weights(self.task_weight, self.safety_weight)


@register
class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    params: TiesParams

    def merge_tensor(self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        from peft.utils.merge_utils import ties  # exact per full tensor: top-k per tensor

        assert tau is not None
        w = _weights(self.params.task_weight, self.params.safety_weight, tau)
        merged = ties([tau, delta], w, self.params.density, self.params.majority_sign_method)
        return theta_task - tau + merged


@dataclasses.dataclass
class DareParams(MethodParams):
    """theta = theta_ref + DARE([tau, Delta_s]) with `peft.utils.merge_utils.dare_linear` /
    `dare_ties`. `density` is the kept fraction; the random mask is seeded per tensor from
    `seed` and the tensor name, so a merge is reproducible."""

    task_weight: NonNegativeFloat = 1.0
    safety_weight: NonNegativeFloat = 1.0
    density: UnitInterval = 0.5
    ties: bool = False
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: NonNegativeInt = 0

    def validate(self) -> None:
        _check_weights(self.task_weight, self.safety_weight)


@register
class Dare(MergeMethod):
    name = "dare"
    Params = DareParams
    params: DareParams

    def merge_tensor(self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        from peft.utils.merge_utils import dare_linear, dare_ties

        assert tau is not None
        w = _weights(self.params.task_weight, self.params.safety_weight, tau)
        devices = [tau.device] if tau.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_tensor_seed(self.params.seed, name))
            if self.params.ties:
                merged = dare_ties([tau, delta], w, self.params.density, self.params.majority_sign_method)
            else:
                merged = dare_linear([tau, delta], w, self.params.density)
        return theta_task - tau + merged
