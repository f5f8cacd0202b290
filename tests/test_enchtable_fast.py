"""EnchTable's fast fine stage is exact: float32 where it is safe (w within 1e-4 of float64,
else the float64 fallback), the cached Delta_s subspace, the batched decomposition, the
alpha-free terms computed ahead in the global pass, the merge pipeline (look-ahead workers,
background writer), and the device-agnostic path on CUDA where there is one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.io.safetensors_stream import (
    BackgroundShardWriter,
    OutputTensor,
    StreamingShardWriter,
)
from hf_safety_merge.merge.pipeline import _prefetch
from hf_safety_merge.methods import interference as M
from hf_safety_merge.vectors import SUBSPACE_CACHE, write_subspace_cache

ALPHAS, LAMS = (0.05, 0.3, 1.0, 3.0), (20.0, 200.0, 2000.0)
# |dw| <= w I |dI / I| <= |dI / I| / e: terms within this relative error keep w within 1e-4
# for every alpha and lam.
TERMS_RTOL = 1e-4 * math.e


def _mat(m: int, n: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((u * s) @ v.T).float()


def _assert_w_close(t: M.InterferenceTerms, ref: M.InterferenceTerms) -> None:
    assert t.rank == ref.rank
    assert abs(t.a - ref.a) <= TERMS_RTOL * abs(ref.a) + 1e-30
    assert abs(t.b - ref.b) <= TERMS_RTOL * abs(ref.b) + 1e-30
    for alpha in ALPHAS:
        for lam in LAMS:
            assert abs(t.weight(alpha, lam) - ref.weight(alpha, lam)) <= 1e-4


n = 96
SPECTRA = {
    "gaussian-like": (torch.linspace(1.0, 0.3, n), "float32"),
    "decay 1e-2": (10 ** (-2 * torch.arange(n) / n), "float32"),
    "decay 1e-6": (10 ** (-6 * torch.arange(n) / n), "float64"),
    "decay 1e-12": (10 ** (-12 * torch.arange(n) / n), "float64"),
    "near-degenerate pairs": (torch.linspace(1, 0.2, n // 2).repeat_interleave(2) * (1 + 1e-10 * torch.arange(n)), "float64"),
    "rank 4 (LoRA-like)": (torch.cat([torch.ones(4), torch.zeros(n - 4)]), "float64"),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("shape", [(3 * n, n), (n, 2 * n)])
def test_auto_precision_matches_float64(name: str, shape: tuple[int, int]) -> None:
    """float32 where the spectrum allows (w within 1e-4 of float64), the float64 fallback elsewhere."""
    s, expected = SPECTRA[name]
    g = torch.Generator().manual_seed(1)
    m, k = max(shape), min(shape)
    tau, delta = _mat(m, k, s.double(), g), _mat(m, k, torch.linspace(1.0, 0.4, k, dtype=torch.float64), g)
    if shape[0] < shape[1]:
        tau, delta = tau.T.contiguous(), delta.T.contiguous()
    ref64, used64 = M.fine_terms(tau, delta, precision="float64")
    auto, used = M.fine_terms(tau, delta)
    assert used64 == "float64" and used == expected
    _assert_w_close(auto, ref64)
    # float64 fine_terms is the documented exact rewrite of the gram backend
    lit = M.interference_terms(tau, delta, backend="gram")
    assert auto.rank == lit.rank
    assert ref64.a == pytest.approx(lit.a, rel=1e-9, abs=1e-300) and ref64.b == pytest.approx(lit.b, rel=1e-9, abs=1e-300)


def test_float64_pass_converts_in_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 pass over float32 matrices taller than a chunk converts them a row chunk at a
    time (no float64 copy): the same Gram upper triangle and cross product, and fine_terms
    still the exact rewrite of the literal gram backend, with and without a cached subspace."""
    monkeypatch.setattr(M, "CONVERT_CHUNK_ELEMENTS", 1)  # 1024-row chunks
    monkeypatch.setattr(M, "CROSS_CHUNK_ELEMENTS", 1)
    g = torch.Generator().manual_seed(5)
    k = 48
    tau = _mat(2600, k, 10 ** (-6 * torch.arange(k, dtype=torch.float64) / k), g)  # needs float64
    delta = _mat(2600, k, torch.linspace(1.0, 0.4, k, dtype=torch.float64), g)
    chunks = list(M._row_chunks(tau, torch.float64, M._chunk_rows(k)))
    assert [i for i, _ in chunks] == [0, 1024, 2048] and all(c.dtype == torch.float64 for _, c in chunks)
    g64 = M._gram_upper(tau, dtype=torch.float64)
    full = tau.double().T @ tau.double()
    assert torch.allclose(g64.triu(), full.triu(), rtol=1e-12, atol=1e-14 * float(full.abs().max()))
    v = torch.linalg.qr(torch.randn(k, 20, generator=g, dtype=torch.float64))[0].T
    cross = M._cross_v(tau, delta, v)
    assert cross.dtype == torch.float64
    assert torch.allclose(cross, (tau.double().T @ delta.double()) @ v.T, rtol=1e-10, atol=1e-12)
    lit = M.interference_terms(tau, delta, backend="gram")
    for sub in (None, M.gram_subspace(delta, k // 2, torch.float64)):
        terms, used = M.fine_terms(tau, delta, delta_subspace=sub)
        assert used == "float64"
        assert terms.a == pytest.approx(lit.a, rel=1e-9) and terms.b == pytest.approx(lit.b, rel=1e-9)
    for t in (tau.T, delta.T):  # wide inputs are oriented tall first (views: converted the same way)
        assert torch.allclose(M._gram_upper(t.T, dtype=torch.float64).triu(), (t.double() @ t.double().T).triu(),
                              rtol=1e-12, atol=1e-14 * float(full.abs().max()))


def test_float32_would_be_wrong_where_it_falls_back() -> None:
    """The fallback is needed: forcing float32 on an ill-conditioned spectrum misses 1e-4."""
    g = torch.Generator().manual_seed(2)
    s = 10 ** (-12 * torch.arange(n, dtype=torch.float64) / n)
    tau, delta = _mat(3 * n, n, s, g), _mat(3 * n, n, s.flip(0).sort(descending=True).values, g)
    ref, _ = M.fine_terms(tau, delta, precision="float64")
    saved = (M.FP32_MIN_EIG_RATIO, M.FP32_MIN_GAP_RATIO)
    try:
        M.FP32_MIN_EIG_RATIO, M.FP32_MIN_GAP_RATIO = 0.0, -1.0
        forced, used = M.fine_terms(tau, delta)
    finally:
        M.FP32_MIN_EIG_RATIO, M.FP32_MIN_GAP_RATIO = saved
    assert used == "float32"
    assert abs(forced.a - ref.a) > TERMS_RTOL * abs(ref.a) or abs(forced.b - ref.b) > TERMS_RTOL * abs(ref.b)


def test_cached_subspace_and_batched_decomposition_match() -> None:
    g = torch.Generator().manual_seed(3)
    tau, delta = torch.randn(200, 80, generator=g), torch.randn(200, 80, generator=g)
    r = 40
    ref, _ = M.fine_terms(tau, delta, precision="float64")
    sub = M.gram_subspace(delta, r, torch.float64)
    cached, _ = M.fine_terms(tau, delta, delta_subspace=M.Subspace(sub.s, sub.v.float()), precision="float64")
    assert cached.a == pytest.approx(ref.a, rel=1e-6) and cached.b == pytest.approx(ref.b, rel=1e-6)
    # a cached subspace with fewer triplets than gamma needs is not used
    short, _ = M.fine_terms(tau, delta, delta_subspace=sub.top(r - 1), precision="float64")
    assert short == ref
    # alpha-linearity: terms of the unscaled delta give the score of the scaled one
    for alpha in (0.1, 2.0):
        lit = M.interference_terms(tau, alpha * delta, backend="gram")
        assert ref.score(alpha, 200.0) == pytest.approx(lam_score(lit), rel=1e-6)  # alpha * delta rounds in float32


def lam_score(t: M.InterferenceTerms, lam: float = 200.0) -> float:
    return lam * (t.a + t.b) / (2 * t.rank) ** 2


def _cfg(fam: dict[str, Path], vec: Path, out: Path, **params: object) -> SafetyMergeConfig:
    return SafetyMergeConfig(task_model=str(fam["task"]), task_reference=str(fam["aligned"]), safety_vector=str(vec),
                             method="enchtable", parameters=dict(params), output_dir=str(out), overwrite=True)


def test_subspace_cache_written_used_and_validated(llama_family: dict[str, Path], tmp_path: Path) -> None:
    vec = tmp_path / "vec"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], vec, progress=False)
    assert (vec / SUBSPACE_CACHE).is_file()
    fresh = merge(_cfg(llama_family, vec, tmp_path / "nocache", subspace_cache=False, precision="float64"), progress=False)
    cached = merge(_cfg(llama_family, vec, tmp_path / "cached"), progress=False)
    mats = [k for k, v in cached.tensors.items() if "rank" in v]
    assert mats and all(cached.tensors[k]["cached_subspace"] for k in mats)
    assert not any(fresh.tensors[k]["cached_subspace"] for k in mats)
    for k in mats:
        assert cached.tensors[k]["w"] == pytest.approx(fresh.tensors[k]["w"], abs=1e-4), k
    # the merge report records the stages and their overlap
    timing = json.loads((tmp_path / "cached" / "merge_report.json").read_text())["timing"]
    assert set(timing) == {"global_pass", "merge_pass"} and 0.0 <= timing["merge_pass"]["overlap"] <= 1.0

    # an edited vector: the cache entry of the edited tensor no longer matches its hash
    edited = tmp_path / "edited"
    shutil.copytree(vec, edited)
    tensors = load_file(edited / "safety_vector.safetensors")
    name = mats[0]
    tensors[name] = tensors[name] * 3.0
    save_file(tensors, edited / "safety_vector.safetensors", metadata={"format": "pt"})
    cfg_path = edited / "safety_vector_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tensor_norms"][name] *= 3.0
    cfg_path.write_text(json.dumps(cfg))
    res = merge(_cfg(llama_family, edited, tmp_path / "out-edited"), progress=False)
    ref = merge(_cfg(llama_family, edited, tmp_path / "out-edited-ref", subspace_cache=False), progress=False)
    assert res.tensors[name]["cached_subspace"] is False
    assert all(res.tensors[k]["cached_subspace"] for k in mats if k != name)
    for k in mats:
        assert res.tensors[k]["w"] == pytest.approx(ref.tensors[k]["w"], abs=1e-4), k

    # an old vector without the cache still merges, the same way
    (edited / SUBSPACE_CACHE).unlink()
    old = merge(_cfg(llama_family, edited, tmp_path / "out-old"), progress=False)
    assert not any(old.tensors[k]["cached_subspace"] for k in mats)
    for k in mats:
        assert old.tensors[k]["w"] == pytest.approx(ref.tensors[k]["w"], abs=1e-4), k
    # and a cache can be added afterwards (benchmarks, vectors made by older versions)
    write_subspace_cache(edited)
    again = merge(_cfg(llama_family, edited, tmp_path / "out-again"), progress=False)
    assert all(again.tensors[k]["cached_subspace"] for k in mats)


def test_save_pretrained_can_skip_the_cache(llama_family: dict[str, Path], tmp_path: Path) -> None:
    v = SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], progress=False)
    v.save_pretrained(tmp_path / "with")
    v.save_pretrained(tmp_path / "without", subspaces=False)
    assert (tmp_path / "with" / SUBSPACE_CACHE).is_file() and not (tmp_path / "without" / SUBSPACE_CACHE).exists()


@pytest.mark.parametrize("readers", [1, 2])
def test_prefetch_order_budget_and_errors(readers: int) -> None:
    names = [f"t{i}" for i in range(12)]
    in_flight, peak = set(), [0]

    def load(n: str) -> str:
        in_flight.add(n)
        peak[0] = max(peak[0], len(in_flight))
        if n == "t7":
            raise ValueError("bad t7")
        return n.upper()

    def prepare(n: str, item: str) -> str:
        return item + "!"

    got = []
    with pytest.raises(ValueError, match="bad t7"):
        for n, item in _prefetch(names, load, prepare, workers=2, nbytes=lambda n: 10, budget=20, readers=readers):
            got.append((n, item))
            in_flight.discard(n)
    assert got == [(f"t{i}", f"T{i}!") for i in range(7)]  # in order, the error at its own tensor
    assert peak[0] <= 3  # budget: two items of 10 ahead (plus the one being consumed)


def test_background_writer_same_files_and_errors(tmp_path: Path) -> None:
    specs = [OutputTensor(f"w{i}", "F32", (8, 4)) for i in range(5)]
    ts = {s.name: torch.randn(8, 4) for s in specs}
    for folder, background in (("sync", False), ("bg", True)):
        w: StreamingShardWriter | BackgroundShardWriter = StreamingShardWriter(tmp_path / folder, specs, 300)
        if background:
            w = BackgroundShardWriter(w)  # type: ignore[arg-type]
        for s in specs:
            w.write(s.name, ts[s.name])
        w.close()
    for f in (tmp_path / "sync").iterdir():
        assert (tmp_path / "bg" / f.name).read_bytes() == f.read_bytes()
    bg = BackgroundShardWriter(StreamingShardWriter(tmp_path / "err", specs, 300))
    bg.write("w0", ts["w0"])
    bg.write("wrong", ts["w1"])  # out of plan order: raised on this thread, at the next call
    with pytest.raises(RuntimeError, match="plan order"):
        for s in specs[1:]:
            bg.write(s.name, ts[s.name])
        bg.close()
    bg.abort()


@pytest.mark.real_model
def test_auto_precision_on_real_smollm2_matrices(smollm2: Path) -> None:
    """Real SmolLM2-135M matrices (weights and layer-to-layer differences, whose spectra decay
    like fine-tuning updates): float32 where allowed, w within 1e-4 of float64."""
    from safetensors import safe_open

    used = []
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        for layer in (3,):
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
                w = [f.get_tensor(f"model.layers.{layer + i}.{proj}.weight").float() for i in range(3)]
                for tau, delta in ((w[1] - w[0], w[2] - w[1]), (w[0], w[1])):
                    ref, _ = M.fine_terms(tau, delta, precision="float64")
                    auto, dt = M.fine_terms(tau, delta)
                    sub = M.gram_subspace(delta, math.floor(0.5 * min(delta.shape)), "auto")
                    cached, _ = M.fine_terms(tau, delta, delta_subspace=M.Subspace(sub.s, sub.v.float()))
                    _assert_w_close(auto, ref)
                    _assert_w_close(cached, ref)
                    used.append(dt)
    assert "float32" in used


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fine_terms_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(4)
    for shape in ((300, 120), (120, 300)):
        tau, delta = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        cpu, dcpu = M.fine_terms(tau, delta)
        gpu, dgpu = M.fine_terms(tau.cuda(), delta.cuda())
        assert dgpu == dcpu
        _assert_w_close(gpu, cpu)
        sub = M.gram_subspace(delta.cuda(), 60, torch.float64)
        cached, _ = M.fine_terms(tau.cuda(), delta.cuda(), delta_subspace=sub)
        _assert_w_close(cached, cpu)


@pytest.mark.parametrize("shape,dtype", [((3,), torch.float32), ((1 << 16,), torch.float32),
                                         (((1 << 16) + 1,), torch.float32), ((700, 333), torch.float32),
                                         ((512, 300), torch.bfloat16), ((0, 4), torch.float32)])
def test_sq_sum_is_the_float64_sum_of_squares(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """`sq_sum` (EnchTable's global norms, the vector's norms, calibration's) equals the float64
    sum of squares up to the order of its additions, through one chunk buffer (no float64 copy),
    for contiguous and transposed tensors alike."""
    from hf_safety_merge.methods.finite import SQ_SUM_CHUNK, sq_sum

    g = torch.Generator().manual_seed(7)
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    for x in (t, t.T if t.ndim == 2 else t):
        ref = float(x.double().pow(2).sum())
        assert sq_sum(x) == pytest.approx(ref, rel=1e-12, abs=0.0)
    assert SQ_SUM_CHUNK < 700 * 333  # the chunked path is exercised
