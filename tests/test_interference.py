"""EnchTable's fine stage: the block-diagonal interference equals the dense 2r x 2r form."""

from __future__ import annotations

import math

import pytest
import torch
from naive_reference import dense_interference

from hf_safety_merge.methods.enchtable import EnchTable, EnchTableParams
from hf_safety_merge.methods.interference import interference_score


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12), (64, 32), (33, 70), (3, 2)])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0])
def test_block_diagonal_equals_dense(shape: tuple[int, int], gamma: float) -> None:
    g = torch.Generator().manual_seed(hash((shape, gamma)) % 2**31)
    tau = torch.randn(shape, generator=g, dtype=torch.float64)
    delta = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    w, info = interference_score(tau, delta, gamma=gamma, lam=200.0, svd_dtype=torch.float64)
    if int(gamma * min(shape)) == 0:
        assert w == 1.0  # nothing kept: no interference
        return
    expected = dense_interference(tau, delta, gamma, 200.0)
    assert info["interference"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert w == pytest.approx(math.exp(-expected), rel=1e-9)


def test_masking_changes_nothing_for_full_rank_and_fixes_low_rank() -> None:
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(40, 30, generator=g, dtype=torch.float64)
    delta = torch.randn(40, 30, generator=g, dtype=torch.float64)
    a, _ = interference_score(tau, delta, svd_dtype=torch.float64, mask_null_triplets=True)
    b, _ = interference_score(tau, delta, svd_dtype=torch.float64, mask_null_triplets=False)
    assert a == pytest.approx(b, rel=1e-12)
    assert a == pytest.approx(math.exp(-dense_interference(tau, delta, mask_null=False)), rel=1e-9)
    # Rank-2 update (a LoRA): the score must not depend on rounding-level noise in tau.
    low = torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g, dtype=torch.float64)
    noisy = low + 1e-13 * torch.randn(40, 30, generator=g, dtype=torch.float64)
    w1, _ = interference_score(low, delta, svd_dtype=torch.float64)
    w2, _ = interference_score(noisy, delta, svd_dtype=torch.float64)
    assert w1 == pytest.approx(w2, rel=1e-6)


def test_zero_tau_means_no_interference() -> None:
    delta = torch.randn(10, 6, dtype=torch.float64)
    w, info = interference_score(torch.zeros(10, 6, dtype=torch.float64), delta, svd_dtype=torch.float64)
    assert w == 1.0 and info["interference"] == 0.0


def test_identical_directions_interfere_more_than_orthogonal_ones() -> None:
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    s = torch.linspace(2, 1, 8, dtype=torch.float64)
    a = q[:, :8] @ torch.diag(s) @ q[:, :8].T  # subspace 0..7
    b_orth = q[:, 8:16] @ torch.diag(s) @ q[:, 8:16].T  # disjoint subspaces
    b_mix = ((q[:, :8] + q[:, 8:16]) / 2**0.5) @ torch.diag(s) @ q[:, :8].T
    w_orth, _ = interference_score(a, b_orth, gamma=0.25, svd_dtype=torch.float64)
    w_mix, _ = interference_score(a, b_mix, gamma=0.25, svd_dtype=torch.float64)
    assert w_orth == pytest.approx(1.0)
    assert w_mix < w_orth


def test_zero_safety_matrix_is_skipped() -> None:
    m = EnchTable(EnchTableParams())
    m.observe("a", torch.ones(4, 4), torch.ones(4, 4))
    m.finish_global()
    theta = torch.randn(4, 4)
    out = m.merge_tensor("z", theta, torch.randn(4, 4), torch.zeros(4, 4))
    assert torch.equal(out, theta)
    assert m.report["z"] == {"w": 1.0, "skipped": "zero safety matrix"}
    # 1-D tensors get w = 1 (reference: no SVD for non-matrices)
    d = torch.ones(4)
    out1 = m.merge_tensor("n", torch.zeros(4), torch.zeros(4), d)
    assert torch.allclose(out1, m.alpha * d) and m.report["n"]["w"] == 1.0


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (64, 64), (100, 7)])
@pytest.mark.parametrize("parallel", [False, True])
def test_gram_backend_and_threads_equal_the_reference_svd(shape: tuple[int, int], parallel: bool) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    tau = torch.randn(shape, generator=g) * 0.02
    delta = torch.randn(shape, generator=g) * 0.001
    ref, ref_info = interference_score(tau, delta, svd_dtype=torch.float64)
    dense = dense_interference(tau.double(), delta.double())
    assert ref_info["interference"] == pytest.approx(dense, rel=1e-8)
    for backend in ("svd", "gram"):
        w, info = interference_score(tau, delta, backend=backend, parallel=parallel,
                                     svd_dtype=torch.float64)
        assert info["interference"] == pytest.approx(dense, rel=1e-6), backend
        assert w == pytest.approx(ref, rel=1e-6)
    # low rank (LoRA-like) updates: masking makes both backends agree
    low = (torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)) * 0.01
    a, _ = interference_score(low, delta, backend="svd", svd_dtype=torch.float64)
    b, _ = interference_score(low, delta, backend="gram", parallel=parallel)
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("backend", ["svd", "gram"])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_interference_is_affine_in_alpha(backend: str, shape: tuple[int, int]) -> None:
    """||M||_1 = alpha * a + b: one decomposition of (tau, Delta_s) gives w for every alpha,
    equal to the engine's own score of (tau, alpha * Delta_s)."""
    from hf_safety_merge.methods.interference import interference_score, interference_terms

    g = torch.Generator().manual_seed(sum(shape))
    tau = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.01
    delta = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.02 + 0.3 * tau
    terms = interference_terms(tau, delta, 0.5, torch.float64, True, backend)
    for alpha in (0.05, 0.3, 1.0, 4.0):
        w, info = interference_score(tau, delta * alpha, 0.5, 200.0, torch.float64, True, backend)
        assert terms.weight(alpha, 200.0) == pytest.approx(w, rel=1e-9, abs=1e-12)
        assert terms.score(alpha, 200.0) == pytest.approx(info["interference"], rel=1e-9)
