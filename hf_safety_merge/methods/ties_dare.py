"""TIES and DARE: `theta = theta_ref + merge([tau, Delta_s], weights)` with peft's `merge_utils`."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import torch

from ..errors import ConfigError
from ..validation import NonNegativeFloat, NonNegativeInt, UnitInterval
from .base import Knob, MergeMethod, MethodParams, register


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "little")) % (2**63)


@dataclasses.dataclass
class _WeightedParams(MethodParams):
    """The two weights (task update, safety vector) and the kept fraction shared by TIES and DARE.

    Attributes:
        task_weight: weight of the task update tau in the combination.
        safety_weight: weight of the safety vector Delta_s in the combination (> 0).
        density: fraction of entries kept per tensor (TIES: the largest magnitudes; DARE: a random
            subset, rescaled by 1/density).
    """

    task_weight: NonNegativeFloat = 1.0
    safety_weight: NonNegativeFloat = 1.0
    density: UnitInterval = 0.5

    def validate(self) -> None:
        if self.safety_weight == 0:
            raise ConfigError("parameter 'safety_weight' = 0: the merge would ignore the safety vector; use a value > 0")


_WEIGHT_KNOBS = {"density": Knob("density: fraction of entries kept per tensor", 0.05, 1.0, 0.05),
                 "task_weight": Knob("weight of the task update τ", 0.0, 2.0, 0.05),
                 "safety_weight": Knob("weight of the safety vector Δs", 0.0, 2.0, 0.05)}


class _WeightedMerge(MergeMethod):
    """theta = theta_ref + combine([tau, Delta_s], [task_weight, safety_weight])."""

    mergekit_model_parameters = {"task.weight": "task_weight", "vector.weight": "safety_weight", "density": "density"}

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

    Attributes:
        task_weight: weight of the task update tau in the combination.
        safety_weight: weight of the safety vector Delta_s in the combination (> 0).
        density: fraction of entries kept per tensor (the largest magnitudes).
        majority_sign_method: how the sign of each entry is elected: 'total' (sign of the sum) or
            'frequency' (most frequent sign).
    """

    majority_sign_method: Literal["total", "frequency"] = "total"


@register
class Ties(_WeightedMerge):
    name = "ties"
    label = "TIES"
    Params = TiesParams
    reference = "TIES-Merging (Yadav et al. 2023, arXiv 2306.01708), `peft.utils.merge_utils.ties`"
    card_text = "TIES merging of the task update and the safety vector (peft.utils.merge_utils.ties)."
    scale = ("density", 0.05, 1.0)
    mergekit_names = {"ties": {}}
    mergekit_normalize = True
    description = "**TIES**: trims `τ` and `Δs` to their largest entries, elects a sign per entry, then adds."
    knobs = _WEIGHT_KNOBS
    toy_parameters = {"density": 0.3}
    params: TiesParams

    def combine(self, name: str, tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        from peft.utils.merge_utils import ties  # exact per full tensor: top-k per tensor

        return ties(tensors, weights, self.params.density, self.params.majority_sign_method)


@dataclasses.dataclass
class DareParams(_WeightedParams):
    """theta = theta_ref + DARE([tau, Delta_s]) with `peft.utils.merge_utils.dare_linear` /
    `dare_ties`. `density` is the kept fraction; the random mask is seeded per tensor from
    `seed` and the tensor name, so a merge is reproducible.

    Attributes:
        task_weight: weight of the task update tau in the combination.
        safety_weight: weight of the safety vector Delta_s in the combination (> 0).
        density: fraction of entries kept per tensor (a random subset, rescaled by 1/density).
        ties: DARE-TIES: elect signs after the random drop (False: plain DARE-linear).
        majority_sign_method: ('ties' only) how the sign of each entry is elected: 'total' (sign
            of the sum) or 'frequency' (most frequent sign).
        seed: seed of DARE's random mask (mixed with each tensor's name, so a merge is reproducible).
    """

    ties: bool = False
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: NonNegativeInt = 0


@register
class Dare(_WeightedMerge):
    name = "dare"
    label = "DARE"
    Params = DareParams
    reference = "DARE (Yu et al. 2024, arXiv 2311.03099), `peft.utils.merge_utils.dare_linear` / `dare_ties`"
    card_text = "DARE merging of the task update and the safety vector (peft.utils.merge_utils)."
    scale = ("density", 0.05, 1.0)
    mergekit_names = {"dare_linear": {"ties": False}, "dare_ties": {"ties": True}, "dare": {}}
    description = "**DARE**: randomly drops and rescales entries of `τ` and `Δs` before adding (seeded)."
    knobs = _WEIGHT_KNOBS
    toy_parameters = {"density": 0.8, "safety_weight": 1.5}
    params: DareParams

    def combine(self, name: str, tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        from peft.utils.merge_utils import dare_linear, dare_ties

        devices = [tensors[0].device] if tensors[0].device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_tensor_seed(self.params.seed, name))
            if self.params.ties:
                return dare_ties(tensors, weights, self.params.density, self.params.majority_sign_method)
            return dare_linear(tensors, weights, self.params.density)
