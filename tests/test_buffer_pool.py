"""The merge pass's buffer pool: reuse and release semantics, and merges through it that are
bit-for-bit the merges without it (every method; float32 and bfloat16 inputs and outputs)."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from naive_reference import load_state
from safetensors.torch import load_file, save_file

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.merge.pipeline import BufferPool

# (`hf_safety_merge.merge` the attribute is the function; the module is in sys.modules)
engine = importlib.import_module("hf_safety_merge.merge.engine")


def test_pool_reuses_a_given_back_buffer_and_drops_one_no_later_take_needs() -> None:
    f32 = torch.float32
    pool = BufferPool([(12, f32), (12, f32), (6, torch.bfloat16)])
    a = pool.take((3, 4), f32)
    assert a.shape == (3, 4) and a.dtype == f32 and pool.owns(a)
    ptr = a.data_ptr()
    pool.give(a)
    assert not pool.owns(a) and pool.held_bytes() == 48  # one more (12, f32) take is planned
    b = pool.take((4, 3), f32)  # same size, another shape: the same memory
    assert b.data_ptr() == ptr and b.shape == (4, 3) and (pool.reused, pool.allocated) == (1, 1)
    pool.give(b)
    assert pool.held_bytes() == 0  # no take of that size is left: dropped, not kept
    d = pool.take((3, 4), f32)  # a third (12, f32) take: not planned, so nothing is kept for it
    pool.give(d)
    assert pool.held_bytes() == 0
    pool2 = BufferPool([(5, f32)] * 3)
    e, f = pool2.take((5,), f32), pool2.take((5,), f32)
    pool2.give(e)
    pool2.give(f)
    assert pool2.held_bytes() == 20  # one take left: one buffer kept, the other dropped
    pool2.skip((5,), f32)  # that take will not happen after all
    assert pool2.held_bytes() == 0
    c = pool.take((2, 3), torch.bfloat16)
    assert c.dtype == torch.bfloat16 and pool.allocated == 3
    # anything the pool did not lend (a tensor of the caller's, a buffer given twice) is ignored
    pool.give(torch.zeros(12))
    pool.give(c)
    pool.give(c)
    pool.give(torch.empty(0))
    assert pool.held_bytes() == 0 and not pool._lent


def test_pool_is_safe_across_threads() -> None:
    n, per = 8, 200
    pool = BufferPool([(1024, torch.float32)] * (n * per))
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(per):
                t = pool.take((1024,), torch.float32)
                t.fill_(float(i))
                assert bool((t == i).all())  # nobody else holds this buffer meanwhile
                pool.give(t)
        except BaseException as e:  # reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not pool._lent
    assert pool.allocated <= n and pool.reused + pool.allocated == n * per


def _bf16_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, dst / f.name, metadata={"format": "pt"})
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(("method", "params"), [
    ("task_arithmetic", {"beta": 0.7}),
    ("enchtable", {"beta": 0.3, "lam": 50.0}),
    ("ties", {"density": 0.5}),
    ("dare", {"density": 0.6, "seed": 3}),
    ("safe_lora", {"select": "threshold", "threshold": 0.3}),
])
@pytest.mark.parametrize("dtypes", ["float32", "bfloat16-out", "bfloat16-in"])
def test_pooled_merge_is_the_unpooled_merge(llama_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            method: str, params: dict[str, Any], dtypes: str) -> None:
    vec = tmp_path / "vec"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], vec, progress=False)
    task = llama_family["task"] if dtypes != "bfloat16-in" else _bf16_copy(llama_family["task"], tmp_path / "task-bf16")
    pools: list[BufferPool | None] = []
    real = engine.merge_pool

    def spy(*args: Any) -> BufferPool | None:
        pools.append(real(*args))
        return pools[-1]

    def run(name: str) -> dict[str, torch.Tensor]:
        cfg = SafetyMergeConfig(task_model=str(task), task_reference=str(llama_family["aligned"]), safety_vector=str(vec),
                                method=method, parameters=params, output_dir=str(tmp_path / name),
                                dtype="bfloat16" if dtypes == "bfloat16-out" else "auto")
        merge(cfg, progress=False)
        return load_state(tmp_path / name)

    monkeypatch.setattr(engine, "merge_pool", spy)
    pooled = run("pooled")
    monkeypatch.setattr(engine, "merge_pool", lambda *a: None)
    plain = run("plain")
    assert set(pooled) == set(plain)
    for k in plain:
        assert pooled[k].dtype == plain[k].dtype and torch.equal(pooled[k], plain[k]), k
    (pool,) = pools
    assert pool is not None and pool.reused > 0  # the layers' buffers were handed out again
    assert not pool._lent  # every buffer came back: none was dropped while still lent, none leaked
    assert pool.held_bytes() == 0  # and none is kept once no later tensor needs it
