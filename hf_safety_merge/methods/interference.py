"""EnchTable's fine-grained interference score `w = exp(-lam ||M||_1 / (2r)^2)` of one weight matrix.

Pure tensor functions (SVD and exact Gram rewrites, top singular subspaces from `eigh(A^T A)`);
used by the `enchtable` method, calibration and the vectors' subspace cache. Imports `errors` only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import ConfigError

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
    evals, evecs = torch.linalg.eigh(_gram_upper(a64), UPLO="U")  # ascending
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
    k1, k2 = _keep(s1, m, n, mask_null_triplets), _keep(s2, m, n, mask_null_triplets)
    if backend == "svd":
        p = (x1 * k1.to(x1.dtype)).T @ (x2 * k2.to(x2.dtype))  # U1r^T U2r (masked)
    else:
        p = _gram_p(v1, x1.T @ x2, v2, s1, s2, k1, k2, 1e-300)
    return _block_terms(p, v1, v2, s1, s2, k1, k2, r)


#: column-block width of `_gram_upper` (blocks narrower than this lose gemm efficiency)
GRAM_BLOCK_MIN = 128
#: rows of `a2` per chunk in `_cross_v` (bounds its m x r workspace to ~16 MiB in float32)
CROSS_CHUNK_ELEMENTS = 4 * 2**20
#: elements per chunk when a matrix is converted to the decomposition's dtype on the fly
#: (`_row_chunks`: a 16 MiB float64 buffer)
CONVERT_CHUNK_ELEMENTS = 2 * 2**20


def _row_chunks(a: torch.Tensor, dtype: torch.dtype, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """`(start, a[start:start + rows] in dtype)` over `a`'s rows: views of a matrix already in
    `dtype`; otherwise each chunk is converted into one reused buffer, so a float64 pass over a
    float32 matrix never holds a float64 copy of it (for SmolLM2's embedding that copy was
    2 x 216 MiB of fresh pages per merge)."""
    m = a.shape[0]
    if a.dtype == dtype or m <= rows:
        a = a.to(dtype)
        for i in range(0, m, rows):
            yield i, a[i : i + rows]
        return
    buf = torch.empty(rows, a.shape[1], dtype=dtype, device=a.device)
    for i in range(0, m, rows):
        k = min(rows, m - i)
        yield i, buf[:k].copy_(a[i : i + k])


def _chunk_rows(n: int) -> int:
    return max(1024, CONVERT_CHUNK_ELEMENTS // max(1, n))


def _gram_upper(a: torch.Tensor, out: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The upper triangle (diagonal included) of the Gram matrix `a^T a` (n x n) in `dtype`
    (default `a`'s), computed by row panels: panel i is `a[:, i]^T a[:, i:]`, so about half the
    multiply-adds of `a.T @ a` (BLAS has no symmetric rank-k update in torch). The strict lower
    triangle of `out` is left as it was (zeros for a fresh buffer); `eigh(..., UPLO="U")` never
    reads it. Exactly the same sums as `a.T @ a` for each upper entry, up to the order of
    floating-point additions (a matrix converted to `dtype` is summed over row chunks)."""
    dt = dtype or a.dtype
    n = a.shape[1]
    g = out if out is not None else torch.zeros(n, n, dtype=dt, device=a.device)
    b = max(GRAM_BLOCK_MIN, -(-n // 8))
    # a matrix already in `dt` is one chunk (no conversion needed: the sums of `a.T @ a`)
    for start, c in _row_chunks(a, dt, _chunk_rows(n) if a.dtype != dt else max(1, a.shape[0])):
        for i in range(0, n, b):
            if start == 0:
                torch.mm(c[:, i : i + b].T, c[:, i:], out=g[i : i + b, i:])
            else:
                g[i : i + b, i:].addmm_(c[:, i : i + b].T, c[:, i:])
    return g


def _cross_v(a1: torch.Tensor, a2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """`(a1^T a2) v2^T` (n x r) in `v2`'s dtype, as `a1^T (a2 v2^T)`: the same multiply-adds for
    the m-sized products as forming `a1^T a2`, but no n x n cross term, so `P` then costs `r n r`
    instead of `r n n + r n r`. Rows are taken in chunks so the `m x r` workspace stays small
    (and inputs in another dtype are converted a chunk at a time, see `_row_chunks`)."""
    m = a1.shape[0]
    r = v2.shape[0]
    dt = v2.dtype
    step = max(1024, CROSS_CHUNK_ELEMENTS // max(1, r))
    if m <= step:
        return a1.to(dt).T @ (a2.to(dt) @ v2.T)
    if a1.dtype != dt or a2.dtype != dt:
        step = min(step, _chunk_rows(a1.shape[1]))
    y = torch.zeros(a1.shape[1], r, dtype=dt, device=a1.device)
    for (_, c1), (_, c2) in zip(_row_chunks(a1, dt, step), _row_chunks(a2, dt, step), strict=True):
        y.addmm_(c1.T, c2 @ v2.T)
    return y


def _keep(s: torch.Tensor, m: int, n: int, mask_null_triplets: bool) -> torch.Tensor:
    """The triplets that enter P and Q: all, or those above the numerical-rank tolerance."""
    return _null_mask(s, m, n) if mask_null_triplets else torch.ones_like(s, dtype=torch.bool)


def _gram_p(v1: torch.Tensor, cross: torch.Tensor | None, v2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
            k1: torch.Tensor, k2: torch.Tensor, tiny: float, cross_v2: torch.Tensor | None = None) -> torch.Tensor:
    """`P = U1r^T U2r = S1^-1 V1r (A1^T A2) V2r^T S2^-1` (masked), with `cross = A1^T A2`, or
    with `cross_v2 = A1^T A2 V2r^T` already formed (`_cross_v`)."""
    inv1 = torch.where(k1, 1.0 / s1.clamp_min(tiny), torch.zeros_like(s1))
    inv2 = torch.where(k2, 1.0 / s2.clamp_min(tiny), torch.zeros_like(s2))
    if cross_v2 is None:
        assert cross is not None
        cross_v2 = cross @ v2.T
    core = v1 @ cross_v2
    return (inv1[:, None] * core) * inv2[None, :]


def _block_terms(p: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                 k1: torch.Tensor, k2: torch.Tensor, r: int) -> InterferenceTerms:
    """`a = ||P S2 Q^T||_1`, `b = ||P^T S1 Q||_1` with `Q = V1r V2r^T` (masked)."""
    q = (v1 * k1.to(v1.dtype)[:, None]) @ (v2 * k2.to(v2.dtype)[:, None]).T  # V1r V2r^T (masked)
    block1 = (p * s2) @ q.T  # P S2 Q^T
    block2 = (p.T * s1) @ q  # P^T S1 Q
    return InterferenceTerms(a=float(block1.abs().sum()), b=float(block2.abs().sum()), rank=r)


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


def _eigh_top(g: torch.Tensor, r: int, uplo: str = "L") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of a batch of symmetric PSD matrices `g` (..., n, n), descending:
    (eigenvalues (..., r), eigenvectors as rows (..., r, n), all eigenvalues descending).
    Only the `uplo` triangle of `g` is read (LAPACK's convention)."""
    evals, evecs = torch.linalg.eigh(g, UPLO=uplo)  # ascending
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
        e, v, evals = _eigh_top(_gram_upper(_tall(a), dtype=dt), r, "U")
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

    - the Gram matrix `A1^T A1` (its upper triangle, `_gram_upper`: half the multiply-adds) and
      `A1^T (A2 V2r^T)` (`_cross_v`, never the n x n cross term) are the only m-sized work;
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
        # the inputs stay as they are: a float64 pass converts them a row chunk at a time
        a1, a2 = a1_in, a2_in
        if delta_subspace is None:
            g = torch.zeros(2, n, n, dtype=dt, device=a1.device)
            _gram_upper(a1, g[0], dt)
            _gram_upper(a2, g[1], dt)
            e, v, evals = _eigh_top(g, r, "U")  # one batched decomposition
            del g
            e1, v1, e2, v2 = e[0], v[0], e[1], v[1]
            if dt == torch.float32 and not (_fp32_resolves(evals[0], r) and _fp32_resolves(evals[1], r)):
                continue
            s2 = e2.clamp_min(0).sqrt()
        else:
            e1, v1, evals = _eigh_top(_gram_upper(a1, dtype=dt), r, "U")
            if dt == torch.float32 and not _fp32_resolves(evals, r):
                continue
            sub = delta_subspace.top(r)
            s2, v2 = sub.s.to(dt), sub.v.to(dt)
        s1 = e1.clamp_min(0).sqrt()
        k1, k2 = _keep(s1, m, n, mask_null_triplets), _keep(s2, m, n, mask_null_triplets)
        p = _gram_p(v1, None, v2, s1, s2, k1, k2, 1e-30 if dt == torch.float32 else 1e-300,
                    cross_v2=_cross_v(a1, a2, v2))
        return _block_terms(p, v1, v2, s1, s2, k1, k2, r), str(dt).removeprefix("torch.")
    raise AssertionError("unreachable")
