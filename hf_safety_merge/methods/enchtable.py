"""EnchTable: `theta = theta_task + w * alpha * Delta_s`, `alpha = beta ||tau|| / ||Delta_s||` (Sec. 3.3).

One registered method; the per-matrix weight `w` comes from `methods.interference`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..validation import NonNegativeFloat, UnitInterval
from .base import Knob, MergeMethod, MethodParams, register
from .finite import sq_sum
from .interference import InterferenceTerms, fine_terms, interference_score, interference_terms


@dataclasses.dataclass
class EnchTableParams(MethodParams):
    """EnchTable's interference-aware merge (defaults from the paper and reference code).

    Attributes:
        beta: coarse scale factor in (0, 100]; `alpha = beta * ||tau|| / ||Delta_s||` (reference
            `--ada --ada_alpha` = 0.1). Default 0.1 unless `alpha` is given.
        alpha: a fixed coarse scale instead of `beta` (> 0): `theta = theta_task + w * alpha *
            Delta_s` whatever the norms; the reference without `--ada` merges with alpha = 1.
            Give exactly one of `beta` and `alpha`.
        gamma: fraction of singular triplets kept per matrix, `r = floor(gamma * min(m, n))` (0.5).
        lam: interference temperature >= 0, `w = exp(-lam * ||M||_1 / (2r)^2)` (200).
        norm_scope: "all" (reference: ||tau|| over every tensor of the checkpoint, ||Delta_s|| over
            every tensor of the vector) or "vector" (both only over the tensors of the vector).
        fine: apply the per-matrix interference weight (False: coarse scaling only).
        svd_dtype: "float32" (reference) or "float64".
        mask_null_triplets: ignore kept triplets whose singular value is numerically zero
            (their singular vectors are arbitrary; matters for low-rank, e.g. LoRA, updates).
            False reproduces the reference literally.
        backend: "gram" (default: exact rewrite through `eigh` of n x n Gram matrices, see
            `fine_terms` and `precision`; 2.5-8x faster than "svd" on CPU and GPU and at least as
            accurate, `benchmarks/bench_enchtable_fine.py`; a whole SmolLM2 merge 4.6x faster,
            `benchmarks/bench_merge.py`) or "svd" (the reference's two `torch.linalg.svd` calls
            per matrix, with `svd_dtype`).
        parallel: ("svd" backend) decompose tau and Delta_s of a matrix concurrently on two
            threads; "auto" does so on the CPU for matrices up to 4M entries. (The "gram" backend
            overlaps decompositions of consecutive matrices in the merge pipeline instead.)
        precision: ("gram" backend) "auto": float32 Gram matrices and `eigh` when the spectrum
            lets float32 pin the kept subspace down (every kept eigenvalue >= 1e-3 of the
            largest, no near-degenerate pair), so that w matches float64 to 1e-4, else float64
            (see `fine_terms`); "float64": always float64.
        subspace_cache: ("gram" backend) use Delta_s's top singular subspaces stored with the
            vector (`subspace_cache.safetensors`, validated by the hash of each tensor) instead of
            decomposing Delta_s at merge time; a vector without the cache, or a tensor whose hash
            does not match, is decomposed as before.
    """

    beta: Annotated[float, Field(gt=0, le=100)] | None = None
    alpha: Annotated[float, Field(gt=0)] | None = None
    gamma: UnitInterval = 0.5
    lam: NonNegativeFloat = 200.0
    norm_scope: Literal["all", "vector"] = "all"
    fine: bool = True
    svd_dtype: Literal["float32", "float64"] = "float32"
    mask_null_triplets: bool = True
    backend: Literal["svd", "gram"] = "gram"
    parallel: bool | Literal["auto"] = "auto"
    precision: Literal["auto", "float64"] = "auto"
    subspace_cache: bool = True

    def validate(self) -> None:
        if self.alpha is not None and self.beta is not None:
            raise ConfigError(
                f"enchtable: give exactly one of 'beta' (alpha = beta * ||tau|| / ||Delta_s||) and 'alpha' "
                f"(a fixed scale), got beta={self.beta} and alpha={self.alpha}"
            )
        if self.alpha is None and self.beta is None:
            self.beta = 0.1  # the paper's and the reference script's ada_alpha


@register
class EnchTable(MergeMethod):
    """theta = theta_task + w * alpha * Delta_s (EnchTable, Sec. 3.3; reference `enchtable_merge`)."""

    name = "enchtable"
    label = "EnchTable"
    Params = EnchTableParams
    reference = "EnchTable (Wu et al. 2025, arXiv 2511.09880), Sec. 3.3; reference code `enchtable_merge`"
    card_text = ("EnchTable (arXiv 2511.09880): `theta = theta_task + w * alpha * Delta_s`, with the coarse "
                 "scale `alpha = beta * ||tau|| / ||Delta_s||` (or a fixed `alpha`) and a per-matrix SVD "
                 "interference weight `w = exp(-I)`.")
    scale = ("beta", 0.01, 10.0)
    mergekit_names = {"enchtable": {}}
    description = ("**EnchTable**: `θ_task + w·α·Δs`, with `α = β‖τ‖/‖Δs‖` and a per-matrix weight "
               "`w = exp(-λ·interference)` that backs off where the safety vector fights the task update.")
    knobs = {"beta": Knob("β: scale of the safety vector", 0.0, 3.0, 0.05),
             "gamma": Knob("γ: fraction of singular directions compared per matrix", 0.05, 1.0, 0.05),
             "lam": Knob("λ: interference temperature (0 = no per-matrix back-off)", 0.0, 500.0, 1.0)}
    #: a tiny, short toy fine-tune needs a larger beta than the paper's 0.1 (docs/study.md, regimes)
    toy_parameters = {"beta": 1.0, "gamma": 0.5, "lam": 5.0}
    closed_form_scale = True
    needs_reference = True
    needs_global_pass = True
    global_pass_all_tensors = True
    params: EnchTableParams

    def __init__(self, params: MethodParams) -> None:
        super().__init__(params)
        self._tau_sq = 0.0
        self._delta_sq = 0.0
        self.alpha: float | None = None
        self._cache: Any = None  # SubspaceCache of the safety vector, if it has one
        self._terms: dict[str, tuple[InterferenceTerms, dict[str, Any]]] = {}
        # squared norms of (tau, delta) taken in `prepare_global` (on a worker), added in order by `observe`
        self._sq: dict[str, tuple[float, float]] = {}

    def use_vector(self, vector: Any) -> None:
        """Called by the engine with the safety vector before the merge (for its subspace cache)."""
        if self.params.subspace_cache and self.params.backend == "gram" and self.params.fine:
            self._cache = vector.subspace_cache()

    def is_prepared(self, name: str) -> bool:
        """Whether `prepare` already ran for `name` (merge_tensor then needs no tau)."""
        return name in self._terms

    def _fine_ready(self, delta: torch.Tensor) -> bool:
        return delta.ndim == 2 and self.params.fine and self.params.backend == "gram"

    def prepare_global(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> None:
        """The global pass's share of one (tau, delta) pair, run by the engine on a worker thread:
        its squared norms, which `observe` then adds in tensor order (the same sums, in the same
        order, as taking them there). The decompositions wait for the merge pass (`prepare`),
        where they overlap the merge and write of earlier matrices."""
        if tau is not None and self.alpha is None:
            self._sq[name] = (sq_sum(tau), sq_sum(delta))

    def prepare(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> None:
        """The alpha-independent part of the fine stage (the decompositions), for one matrix.

        The engine runs this on worker threads ahead of `merge_tensor` in the merge pass
        (decompositions of matrices i+1, i+2, ... overlap the merge and write of matrix i and the
        read of the next); `merge_tensor` then only evaluates w(alpha). Exactly the computation
        `merge_tensor` would do itself (it calls this when the engine did not)."""
        if tau is None or not self._fine_ready(delta):
            return
        if not bool(delta.any()):
            self._terms[name] = (InterferenceTerms(0.0, 0.0, 0), {"skipped": "zero safety matrix"})
            return
        sub = self._cache.get(name, delta) if self._cache is not None else None
        terms, used = fine_terms(tau, delta, self.params.gamma, delta_subspace=sub, precision=self.params.precision,
                                 mask_null_triplets=self.params.mask_null_triplets)
        self._terms[name] = (terms, {"rank": terms.rank, "precision": used, "cached_subspace": sub is not None})

    def observed_in_prepare_global(self, name: str) -> bool:
        """Whether `prepare_global` already took what `observe` needs from tensor `name` (the
        engine then keeps none of its tensors for the main thread)."""
        return name in self._sq

    def observe(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor | None) -> None:
        if (sq := self._sq.pop(name, None)) is not None:
            self._tau_sq += sq[0]
            self._delta_sq += sq[1]
            return
        if tau is not None and (delta is not None or self.params.norm_scope == "all"):
            self._tau_sq += sq_sum(tau)
        if delta is not None:
            self._delta_sq += sq_sum(delta)

    def finish_global(self) -> None:
        tau_norm, delta_norm = math.sqrt(self._tau_sq), math.sqrt(self._delta_sq)
        if delta_norm == 0:
            raise ConfigError("the safety vector is zero everywhere: nothing to merge")
        # Coarse scale (EnchTable Eq. for alpha): alpha = beta * ||tau|| / ||Delta_s||, or the
        # fixed `alpha` (the reference without --ada: alpha = 1).
        if self.params.alpha is not None:
            self.alpha = float(self.params.alpha)
        else:
            assert self.params.beta is not None
            self.alpha = self.params.beta * tau_norm / delta_norm
        self._norms = {"tau_norm": tau_norm, "safety_vector_norm": delta_norm}

    def summary(self) -> dict[str, Any]:
        return {"alpha": self.alpha, **getattr(self, "_norms", {})}

    def merge_tensor(self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        assert self.alpha is not None and (tau is not None or self.is_prepared(name))
        scaled = delta * self.alpha
        w = 1.0
        info: dict[str, Any] = {}
        if self._fine_ready(delta):
            if name not in self._terms:
                self.prepare(name, tau, delta)
            terms, info = self._terms.pop(name)
            if terms.rank > 0:
                score = terms.score(self.alpha, self.params.lam)
                w = math.exp(-score)
                info = {"interference": score, **info}
        elif delta.ndim == 2 and self.params.fine:
            if not bool(delta.any()):
                info = {"skipped": "zero safety matrix"}
            else:
                assert tau is not None
                svd_dtype = torch.float64 if self.params.svd_dtype == "float64" else torch.float32
                parallel = self.params.parallel
                if parallel == "auto":
                    parallel = tau.device.type == "cpu" and tau.numel() <= 4 * 2**20 and torch.get_num_threads() > 1
                w, info = interference_score(
                    tau, scaled, self.params.gamma, self.params.lam, svd_dtype, self.params.mask_null_triplets,
                    backend=self.params.backend, parallel=bool(parallel),
                )
        self.report[name] = {"w": w, **info}
        if self.theta_owned:  # same operations as `theta_task + w * scaled`, without new buffers
            return theta_task.add_(scaled.mul_(w))
        return theta_task + w * scaled

    # a scale search in closed form (calibration, repair) ---------------------------------
    def scale_terms(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> tuple[Any, dict[str, Any]] | None:
        """One decomposition per matrix gives `InterferenceTerms` (a, b) with `||M||_1 = alpha a + b`,
        so `w(alpha)` at any beta needs no further decomposition (exact)."""
        p = self.params
        if delta.ndim != 2 or not p.fine or tau is None:
            return None
        self.prepare(name, tau, delta)  # the engine's own fine stage ("gram" backend)
        if name in self._terms:
            return self._terms.pop(name)
        if bool(delta.any()):  # "svd" backend: the same (a, b) by the reference's SVDs
            svd_dtype = torch.float64 if p.svd_dtype == "float64" else torch.float32
            terms = interference_terms(tau, delta, p.gamma, svd_dtype, p.mask_null_triplets, p.backend)
            return terms, {"rank": terms.rank}
        return None

    def _probe_alpha(self, norm_ratio: float) -> float:
        if self.params.alpha is not None:
            raise ConfigError("calibration searches enchtable's 'beta': remove the fixed 'alpha' from the parameters")
        assert self.params.beta is not None
        return self.params.beta * norm_ratio

    def merge_with_terms(self, theta_task: torch.Tensor, delta: torch.Tensor, terms: Any,
                         norm_ratio: float) -> tuple[torch.Tensor, float | None]:
        alpha = self._probe_alpha(norm_ratio)
        w = terms.weight(alpha, self.params.lam) if terms is not None and terms.rank > 0 else None
        return theta_task + (1.0 if w is None else w) * (delta * alpha), w

    def closed_form_summary(self, norm_ratio: float, weights: list[float]) -> dict[str, Any]:
        return {"alpha": self._probe_alpha(norm_ratio), "w_mean": sum(weights) / len(weights) if weights else 1.0,
                "w_min": min(weights, default=1.0)}

    def with_terms(self, terms: dict[str, Any], info: dict[str, dict[str, Any]]) -> MergeMethod:
        if not terms or self.params.backend != "gram":
            return self
        return _EnchTableWithTerms(self.params, terms, info)


class _EnchTableWithTerms(EnchTable):
    """EnchTable whose per-matrix fine-stage terms come from a scale search, so the final streaming
    merge does not decompose every matrix a second time: its `prepare` hands out the stored terms,
    and the base class evaluates w(alpha) exactly as in any merge."""

    def __init__(self, params: Any, terms: dict[str, InterferenceTerms], info: dict[str, dict[str, Any]]) -> None:
        super().__init__(params)
        self._stored = {n: (t, {**info.get(n, {"rank": t.rank}), "from": "calibration"}) for n, t in terms.items()}

    def is_prepared(self, name: str) -> bool:
        """Stored terms need no tau (the merge pass then reads no reference tensor for them)."""
        return name in self._stored or super().is_prepared(name)

    def prepare(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> None:
        if name in self._stored:
            self._terms[name] = self._stored[name]
            return
        super().prepare(name, tau, delta)
