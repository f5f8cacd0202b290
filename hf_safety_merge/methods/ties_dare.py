"""TIES and DARE: `theta = theta_ref + merge([tau, Delta_s], weights)` with peft's `merge_utils`."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import torch

from ..errors import ConfigError
from ..validation import NonNegativeFloat, NonNegativeInt, UnitInterval
from .base import MergeMethod, MethodParams, register


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little")) % (2**63)


@dataclasses.dataclass
class _WeightedParams(MethodParams):
    """The two weights (task update, safety vector) and the kept fraction shared by TIES and DARE."""

    task_weight: NonNegativeFloat = 1.0
    safety_weight: NonNegativeFloat = 1.0
    density: UnitInterval = 0.5

    def validate(self) -> None:
        if self.safety_weight == 0:
            raise ConfigError("parameter 'safety_weight' = 0: the merge would ignore the safety vector; use a value > 0")


class _WeightedMerge(MergeMethod):
    """theta = theta_ref + combine([tau, Delta_s], [task_weight, safety_weight])."""

    params: _WeightedParams

    def combine(self, name: str, tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def merge_tensor(self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        assert tau is not None
        w = torch.tensor([self.params.task_weight, self.params.safety_weight], dtype=tau.dtype, device=tau.device)
        return theta_task - tau + self.combine(name, [tau, delta], w)


@dataclasses.dataclass
class TiesParams(_WeightedParams):
    """theta = theta_ref + TIES([tau, Delta_s], weights) with `peft.utils.merge_utils.ties`.

    Attributes: task_weight, safety_weight (the two weights), density (kept fraction per
    tensor, magnitude top-k), majority_sign_method ("total" or "frequency").
    """

    majority_sign_method: Literal["total", "frequency"] = "total"


@register
class Ties(_WeightedMerge):
    name = "ties"
    Params = TiesParams
    params: TiesParams

    def combine(self, name: str, tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        from peft.utils.merge_utils import ties  # exact per full tensor: top-k per tensor

        return ties(tensors, weights, self.params.density, self.params.majority_sign_method)


@dataclasses.dataclass
class DareParams(_WeightedParams):
    """theta = theta_ref + DARE([tau, Delta_s]) with `peft.utils.merge_utils.dare_linear` /
    `dare_ties`. `density` is the kept fraction; the random mask is seeded per tensor from
    `seed` and the tensor name, so a merge is reproducible."""

    ties: bool = False
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: NonNegativeInt = 0


@register
class Dare(_WeightedMerge):
    name = "dare"
    Params = DareParams
    params: DareParams

    def combine(self, name: str, tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        from peft.utils.merge_utils import dare_linear, dare_ties

        devices = [tensors[0].device] if tensors[0].device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_tensor_seed(self.params.seed, name))
            if self.params.ties:
                return dare_ties(tensors, weights, self.params.density, self.params.majority_sign_method)
            return dare_linear(tensors, weights, self.params.density)
