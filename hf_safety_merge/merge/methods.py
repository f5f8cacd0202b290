"""Merge methods: EnchTable, task arithmetic (RESTA), Safe LoRA, TIES and DARE."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..validation import NonNegativeFloat, NonNegativeInt, UnitInterval
from .base import MergeMethod, MethodParams, register

# ===================================================================================== EnchTable
_FP32_EPS = torch.finfo(torch.float32).eps
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="enchtable-svd")
    return _POOL


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def _null_mask(s: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """True for singular values above the numerical-rank tolerance `max(m, n) * eps32 * s_max`.

    Inputs are at most fp32-accurate (tau is a difference of fp32/bf16 weights), so the
    tolerance uses fp32's eps whatever dtype the decomposition runs in.
    """
    if s.numel() == 0:
        return torch.ones_like(s, dtype=torch.bool)
    return s > max(m, n) * _FP32_EPS * float(s.max())


def _svd_top(a: torch.Tensor, r: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # full_matrices=False: the reduced SVD, as the reference (`torch.linalg.svd`).
    u, s, vh = torch.linalg.svd(a.to(dtype), full_matrices=False)
    return u[:, :r], s[:r], vh[:r, :]


def _gram_top(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r right singular vectors (rows) and values of `a` (m >= n) from `eigh(a^T a)` in fp64."""
    a64 = a.to(torch.float64)
    evals, evecs = torch.linalg.eigh(a64.T @ a64)  # ascending
    idx = torch.arange(evals.numel() - 1, evals.numel() - 1 - r, -1, device=a.device)
    s = evals[idx].clamp_min(0).sqrt()
    return a64, s, evecs[:, idx].T.contiguous()


def interference_score(
    tau: torch.Tensor,
    delta: torch.Tensor,
    gamma: float = 0.5,
    lam: float = 200.0,
    svd_dtype: torch.dtype = torch.float32,
    mask_null_triplets: bool = True,
    backend: str = "svd",
    parallel: bool = False,
) -> tuple[float, dict[str, Any]]:
    """EnchTable's fine-grained interference score of one weight matrix, and w = exp(-I).

    With `tau = U1 S1 V1` and `delta = U2 S2 V2` (delta already scaled by alpha), keep the top
    `r_i = floor(gamma * min(m, n))` triplets of each, stack `U = [U1r | U2r]`, `V = [V1r; V2r]`,
    `S = diag(S1r, S2r)`, and form the interference matrix (EnchTable, Sec. 3.3)

        M = (U^T U - I) S (V V^T - I),   I = lam * ||M||_1 / (r1 + r2)^2,   w = exp(-I)

    where ||.||_1 is the entrywise L1 norm (the reference's `torch.norm(M, p=1)`, divided by both
    dimensions of M, times 200). Because U1r, U2r (and V1r, V2r) each have orthonormal columns
    (rows), `U^T U - I = [[0, P], [P^T, 0]]` with `P = U1r^T U2r`, and `V V^T - I = [[0, Q],
    [Q^T, 0]]` with `Q = V1r V2r^T`, so M is block diagonal:

        M = [[P S2 Q^T, 0], [0, P^T S1 Q]]

    and ||M||_1 = ||P S2 Q^T||_1 + ||P^T S1 Q||_1, never forming the 2r x 2r matrix (an exact
    rewrite, tested against the dense form).

    Backends (both exact in exact arithmetic; tested against each other and the dense form):
      - "svd": `torch.linalg.svd` of both matrices, as the reference.
      - "gram": no left singular vectors at all. With `m >= n` (else transpose both: ||M||_1 is
        invariant), `V_i, S_i` come from `eigh(A_i^T A_i)` in float64, and
        `P = U1r^T U2r = S1^-1 V1r (A1^T A2) V2r^T S2^-1`; n x n work instead of m x n SVDs.
    `parallel` decomposes tau and delta concurrently on two threads (one intra-op thread each),
    which is faster on small CPUs and robust when other processes compete for the cores.

    Returns (w, diagnostics).
    """
    terms = interference_terms(tau, delta, gamma, svd_dtype, mask_null_triplets, backend, parallel)
    if terms.rank <= 0:
        return 1.0, {"interference": 0.0, "rank": 0}
    score = terms.score(1.0, lam)
    return math.exp(-score), {"interference": score, "rank": terms.rank}


@dataclasses.dataclass(frozen=True)
class InterferenceTerms:
    """The two entrywise L1 norms of EnchTable's block-diagonal interference matrix.

    For `delta` scaled by alpha, the singular vectors are alpha's-independent and the singular
    values scale by alpha, so `||M||_1 = alpha * a + b` with `a = ||P S2 Q^T||_1` (S2 of the
    unscaled delta) and `b = ||P^T S1 Q||_1`: one decomposition gives w(alpha) for every alpha
    (used by calibration; tested against `interference_score`).
    """

    a: float
    b: float
    rank: int

    def score(self, alpha: float, lam: float) -> float:
        """I = lam * (alpha a + b) / (2r)^2."""
        if self.rank <= 0:
            return 0.0
        return lam * (alpha * self.a + self.b) / float((2 * self.rank) ** 2)

    def weight(self, alpha: float, lam: float) -> float:
        """w = exp(-I)."""
        return math.exp(-self.score(alpha, lam))


def interference_terms(
    tau: torch.Tensor,
    delta: torch.Tensor,
    gamma: float = 0.5,
    svd_dtype: torch.dtype = torch.float32,
    mask_null_triplets: bool = True,
    backend: str = "svd",
    parallel: bool = False,
) -> InterferenceTerms:
    """The (a, b) terms of `interference_score` for one matrix (see `InterferenceTerms`);
    `interference_score(tau, alpha * delta)` is `exp(-lam (a + b) / (2r)^2)` of
    `interference_terms(tau, alpha * delta)`, computed by exactly these operations."""
    m, n = tau.shape
    r = math.floor(gamma * min(m, n))
    if r <= 0:
        return InterferenceTerms(0.0, 0.0, 0)
    if backend == "gram" and m < n:
        tau, delta, m, n = tau.T, delta.T, n, m
    if backend == "svd":
        def work(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return _svd_top(a, r, svd_dtype)
    elif backend == "gram":
        def work(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return _gram_top(a, r)
    else:
        raise ConfigError(f"unknown EnchTable backend {backend!r}; use 'svd' or 'gram'")
    if parallel:
        with _intra_op_threads(1):
            f1, f2 = _pool().submit(work, tau), _pool().submit(work, delta)
            (x1, s1, v1), (x2, s2, v2) = f1.result(), f2.result()
    else:
        (x1, s1, v1), (x2, s2, v2) = work(tau), work(delta)
    # Deviation from the reference (documented): a zero singular value's vectors are an arbitrary
    # orthonormal completion (any is a valid SVD), so for rank-deficient updates (LoRA: rank <=
    # r) the literal score depends on LAPACK's choice. Triplets below the numerical-rank
    # tolerance carry no energy; they are dropped from P and Q. For full-rank matrices this
    # changes nothing (tested); the (r1 + r2)^2 normalisation is kept.
    k1 = _null_mask(s1, m, n) if mask_null_triplets else torch.ones_like(s1, dtype=torch.bool)
    k2 = _null_mask(s2, m, n) if mask_null_triplets else torch.ones_like(s2, dtype=torch.bool)
    if backend == "svd":
        k1f, k2f = k1.to(x1.dtype), k2.to(x2.dtype)
        p = (x1 * k1f).T @ (x2 * k2f)  # U1r^T U2r (masked)
    else:
        inv1 = torch.where(k1, 1.0 / s1.clamp_min(1e-300), torch.zeros_like(s1))
        inv2 = torch.where(k2, 1.0 / s2.clamp_min(1e-300), torch.zeros_like(s2))
        p = (inv1[:, None] * (v1 @ (x1.T @ x2) @ v2.T)) * inv2[None, :]
        k1f, k2f = k1.to(v1.dtype), k2.to(v2.dtype)
    q = (v1 * k1f[:, None]) @ (v2 * k2f[:, None]).T  # V1r V2r^T (masked)
    block1 = (p * s2) @ q.T  # P S2 Q^T
    block2 = (p.T * s1) @ q  # P^T S1 Q
    return InterferenceTerms(a=float(block1.abs().sum()), b=float(block2.abs().sum()), rank=r)


# ------------------------------------------------------------------ fast exact fine stage (gram)
#: A float32 Gram decomposition is used only when every kept eigenvalue is at least this fraction
#: of the largest (singular values >= ~3% of the largest, far above float32's resolution of a
#: Gram matrix, ~sqrt(eps32)) ...
FP32_MIN_EIG_RATIO = 1e-3
#: ... and every gap between consecutive eigenvalues among the top r + 1 is at least this
#: fraction of the largest (eigenvectors of float32 eigh are accurate to ~eps32 / gap).
FP32_MIN_GAP_RATIO = 1e-6


@dataclasses.dataclass(frozen=True)
class Subspace:
    """Top right singular subspace of a matrix `A` oriented tall (`m >= n`; else of `A^T`):
    rows of `v` (k x n) are right singular vectors, `s` (k) the singular values, descending."""

    s: torch.Tensor
    v: torch.Tensor

    def top(self, r: int) -> Subspace:
        return Subspace(self.s[:r], self.v[:r])


def _tall(a: torch.Tensor) -> torch.Tensor:
    return a if a.shape[0] >= a.shape[1] else a.T


def _eigh_top(g: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of a batch of symmetric PSD matrices `g` (..., n, n), descending:
    (eigenvalues (..., r), eigenvectors as rows (..., r, n), all eigenvalues descending)."""
    evals, evecs = torch.linalg.eigh(g)  # ascending
    evals = evals.flip(-1)
    return evals[..., :r], evecs.flip(-1)[..., :r].transpose(-1, -2), evals


def _fp32_resolves(evals_desc: torch.Tensor, r: int) -> bool:
    """Whether a float32 eigh of a Gram matrix pins down its top-r subspace well enough that w
    matches the float64 one to 1e-4 (tested on real and ill-conditioned matrices)."""
    top = evals_desc[..., : r + 1].double()
    emax = top[..., :1].clamp_min(1e-300)
    if bool((top[..., r - 1 : r] < FP32_MIN_EIG_RATIO * emax).any()):
        return False
    gaps = top[..., :-1] - top[..., 1:]
    return not bool((gaps < FP32_MIN_GAP_RATIO * emax).any())


def gram_subspace(a: torch.Tensor, r: int, dtype: torch.dtype | str = torch.float64) -> Subspace:
    """Top-r right singular subspace of `a` (oriented tall) from `eigh(a^T a)` in `dtype`
    ("auto": float32 where `_fp32_resolves`, else float64)."""
    for dt in ([torch.float32, torch.float64] if dtype == "auto" else [dtype]):
        assert isinstance(dt, torch.dtype)
        t = _tall(a).to(dt)
        e, v, evals = _eigh_top(t.T @ t, r)
        if dtype == "auto" and dt == torch.float32 and not _fp32_resolves(evals, r):
            continue
        return Subspace(e.double().clamp_min(0).sqrt(), v)
    raise AssertionError("unreachable")


def fine_terms(
    tau: torch.Tensor,
    delta: torch.Tensor,
    gamma: float = 0.5,
    *,
    delta_subspace: Subspace | None = None,
    precision: str = "auto",
    mask_null_triplets: bool = True,
) -> tuple[InterferenceTerms, str]:
    """`interference_terms(tau, delta, gamma, backend="gram")`, faster and as exact:

    - the Gram matrix `A1^T A1` and the cross term `A1^T A2` are the only m-sized work;
    - `delta_subspace` (Delta_s's top singular subspace, cached with the vector) replaces the
      decomposition of delta (half the work);
    - without a cache, tau's and delta's Gram matrices go through one batched `eigh`;
    - `precision="auto"` runs in float32 when the spectrum allows it (`_fp32_resolves`) and
      falls back to float64 otherwise; "float64" always uses float64.

    `delta` is the unscaled safety matrix: the terms are linear in its scale (`InterferenceTerms`).
    Returns (terms, the dtype that was used).
    """
    m, n = tau.shape
    r = math.floor(gamma * min(m, n))
    if r <= 0:
        return InterferenceTerms(0.0, 0.0, 0), "none"
    a1_in, a2_in = _tall(tau), _tall(delta)
    m, n = a1_in.shape
    if delta_subspace is not None and delta_subspace.s.numel() < r:
        delta_subspace = None
    dtypes = [torch.float32, torch.float64] if precision == "auto" else [torch.float64]
    for dt in dtypes:
        a1, a2 = a1_in.to(dt), a2_in.to(dt)
        g1 = a1.T @ a1
        cross = a1.T @ a2
        if delta_subspace is None:
            g2 = a2.T @ a2
            e, v, evals = _eigh_top(torch.stack([g1, g2]), r)  # one batched decomposition
            e1, v1, e2, v2 = e[0], v[0], e[1], v[1]
            if dt == torch.float32 and not (_fp32_resolves(evals[0], r) and _fp32_resolves(evals[1], r)):
                continue
            s2 = e2.clamp_min(0).sqrt()
        else:
            e1, v1, evals = _eigh_top(g1, r)
            if dt == torch.float32 and not _fp32_resolves(evals, r):
                continue
            sub = delta_subspace.top(r)
            s2, v2 = sub.s.to(dt), sub.v.to(dt)
        s1 = e1.clamp_min(0).sqrt()
        k1 = _null_mask(s1, m, n) if mask_null_triplets else torch.ones_like(s1, dtype=torch.bool)
        k2 = _null_mask(s2, m, n) if mask_null_triplets else torch.ones_like(s2, dtype=torch.bool)
        inv1 = torch.where(k1, 1.0 / s1.clamp_min(1e-30 if dt == torch.float32 else 1e-300), torch.zeros_like(s1))
        inv2 = torch.where(k2, 1.0 / s2.clamp_min(1e-30 if dt == torch.float32 else 1e-300), torch.zeros_like(s2))
        p = (inv1[:, None] * (v1 @ cross @ v2.T)) * inv2[None, :]  # U1r^T U2r (masked)
        q = (v1 * k1.to(dt)[:, None]) @ (v2 * k2.to(dt)[:, None]).T  # V1r V2r^T (masked)
        block1 = (p * s2) @ q.T  # P S2 Q^T
        block2 = (p.T * s1) @ q  # P^T S1 Q
        return InterferenceTerms(a=float(block1.abs().sum()), b=float(block2.abs().sum()), rank=r), str(dt).removeprefix("torch.")
    raise AssertionError("unreachable")


def _sq_sum(t: torch.Tensor) -> float:
    """`float(t.double().pow(2).sum())`, bit for bit, with one float64 buffer instead of two."""
    d = t.to(torch.float64, copy=True)
    return float(d.mul_(d).sum())


@dataclasses.dataclass
class EnchTableParams(MethodParams):
    """EnchTable's interference-aware merge (defaults from the paper and reference code).

    Attributes:
        beta: coarse scale factor in (0, 100]; `alpha = beta * ||tau|| / ||Delta_s||` (reference
            `ada_alpha` = 0.1).
        gamma: fraction of singular triplets kept per matrix, `r = floor(gamma * min(m, n))` (0.5).
        lam: interference temperature >= 0, `w = exp(-lam * ||M||_1 / (2r)^2)` (200).
        norm_scope: "all" (reference: ||tau|| over every tensor of the checkpoint, ||Delta_s|| over
            every tensor of the vector) or "vector" (both only over the tensors of the vector).
        fine: apply the per-matrix interference weight (False: coarse scaling only).
        svd_dtype: "float32" (reference) or "float64".
        mask_null_triplets: ignore kept triplets whose singular value is numerically zero
            (their singular vectors are arbitrary; matters for low-rank, e.g. LoRA, updates).
            False reproduces the reference literally.
        backend: "gram" (default: exact rewrite through `eigh` of n x n Gram matrices in float64,
            see `interference_score`; 2.5-8x faster than "svd" on CPU and GPU and at least as
            accurate, `benchmarks/bench_enchtable_fine.py`) or "svd" (the reference's two
            `torch.linalg.svd` calls per matrix, with `svd_dtype`).
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

    beta: Annotated[float, Field(gt=0, le=100)] = 0.1
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


@register
class EnchTable(MergeMethod):
    """theta = theta_task + w * alpha * Delta_s (EnchTable, Sec. 3.3; reference `enchtable_merge`)."""

    name = "enchtable"
    Params = EnchTableParams
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

    def use_vector(self, vector: Any) -> None:
        """Called by the engine with the safety vector before the merge (for its subspace cache)."""
        if self.params.subspace_cache and self.params.backend == "gram" and self.params.fine:
            self._cache = vector.subspace_cache()

    def is_prepared(self, name: str) -> bool:
        """Whether `prepare` already ran for `name` (merge_tensor then needs no tau)."""
        return name in self._terms

    def _fine_ready(self, delta: torch.Tensor) -> bool:
        return delta.ndim == 2 and self.params.fine and self.params.backend == "gram"

    def prepare(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> None:
        """The alpha-independent part of the fine stage (the decompositions), for one matrix.

        The engine runs this on worker threads ahead of `merge_tensor` (decompositions of
        matrices i+1, i+2 overlap the merge and write of matrix i and the read of the next);
        `merge_tensor` then only evaluates w(alpha). Exactly the computation `merge_tensor`
        would do itself (it calls this when the engine did not)."""
        if tau is None or not self._fine_ready(delta):
            return
        if not bool(delta.any()):
            self._terms[name] = (InterferenceTerms(0.0, 0.0, 0), {"skipped": "zero safety matrix"})
            return
        sub = self._cache.get(name, delta) if self._cache is not None else None
        terms, used = fine_terms(tau, delta, self.params.gamma, delta_subspace=sub, precision=self.params.precision,
                                 mask_null_triplets=self.params.mask_null_triplets)
        self._terms[name] = (terms, {"rank": terms.rank, "precision": used, "cached_subspace": sub is not None})

    def observe(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor | None) -> None:
        if tau is not None and (delta is not None or self.params.norm_scope == "all"):
            self._tau_sq += _sq_sum(tau)
        if delta is not None:
            self._delta_sq += _sq_sum(delta)

    def finish_global(self) -> None:
        tau_norm, delta_norm = math.sqrt(self._tau_sq), math.sqrt(self._delta_sq)
        if delta_norm == 0:
            raise ConfigError("the safety vector is zero everywhere: nothing to merge")
        # Coarse scale (EnchTable Eq. for alpha): alpha = beta * ||tau|| / ||Delta_s||.
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


# ============================================================================ task arithmetic
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


# ================================================================================== Safe LoRA
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
    """

    select: Literal["number", "threshold"] = "number"
    threshold: Annotated[float, Field(ge=-1, le=1)] = 0.5
    num_proj_layers: NonNegativeInt = 10


@register
class SafeLora(MergeMethod):
    name = "safe_lora"
    Params = SafeLoraParams
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


# ============================================================================== TIES and DARE
def _check_weights(task_weight: float, safety_weight: float) -> None:
    if safety_weight == 0:
        raise ConfigError("parameter 'safety_weight' = 0: the merge would ignore the safety vector; use a value > 0")


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
        w = torch.tensor([self.params.task_weight, self.params.safety_weight], dtype=tau.dtype, device=tau.device)
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
        w = torch.tensor([self.params.task_weight, self.params.safety_weight], dtype=tau.dtype, device=tau.device)
        devices = [tau.device] if tau.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_tensor_seed(self.params.seed, name))
            if self.params.ties:
                merged = dare_ties([tau, delta], w, self.params.density, self.params.majority_sign_method)
            else:
                merged = dare_linear([tau, delta], w, self.params.density)
        return theta_task - tau + merged
