"""Sharded training on 2 CPU processes (gloo) that really shard: FSDP2's `fully_shard`.

- The AsFT penalty's sharded form against one process: value and gradient of every LoRA weight,
  dense and factor anchors, an uneven shard of `A` (r=3 over 2 processes), DTensor placements and
  local shapes asserted inside the computation.
- The AsFT TRL script under `accelerate launch` with `--fsdp ... --fsdp_config {"version": 2}`
  (on CPU accelerate would silently run DDP; the trainer applies `fully_shard` itself) against
  one process: penalty per step, loss trajectory, the saved adapter; sharding seen in the step;
  anchors per process half of the whole.
- SafeKey and distillation refuse FSDP2 at start-up with one line naming the engine to use; FSDP1
  is refused for AsFT.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_asft_training import lora_model, make_tiny_setup

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
needs_accelerate = pytest.mark.skipif(shutil.which("accelerate", path=str(ACCELERATE.parent)) is None,
                                      reason="accelerate CLI not installed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_setup(tmp_path_factory.mktemp("sharded"))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# ---------------------------------------------------------------------------------------------
# The penalty and its gradient, sharded vs one process
# ---------------------------------------------------------------------------------------------


def _seed_lora(model: Any, seed: int) -> None:
    """LoRA B starts at zero (PEFT): give B and A seeded values so the penalty and both gradients
    are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _one_process_reference(paths: dict[str, str], targets: tuple[str, ...], anchors: Any, scaling: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The penalty and the LoRA gradients of one process (the reference), on seeded LoRA weights."""
    from hf_safety_merge.training.asft.peft_mixin import bind_anchors, find_lora_targets
    from hf_safety_merge.training.asft.penalty import anchored_penalty

    ref = lora_model(Path(paths["aligned"]), r=3, targets=targets)
    _seed_lora(ref, 7)
    p_ref = anchored_penalty(bind_anchors(find_lora_targets(ref), anchors), scaling)
    assert p_ref is not None
    p_ref.backward()
    return float(p_ref), {n: p.grad.clone() for n, p in ref.named_parameters() if "lora_" in n}


def _penalty_worker(rank: int, world: int, init: str, paths: dict[str, str], out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from hf_safety_merge.training import AlignmentAnchors
    from hf_safety_merge.training.asft.peft_mixin import bind_anchors, find_lora_targets
    from hf_safety_merge.training.asft.penalty import sharded_penalty_terms
    from hf_safety_merge.training.sharding import COMM_BYTES, apply_fsdp2, reset_comm_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results: dict[str, Any] = {}
    try:
        targets = ("q_proj", "v_proj", "up_proj", "down_proj")
        for projector, k in (("safe_lora", None), ("topk", 3)):
            modules = [f"model.layers.{i}.{'self_attn' if t.endswith(('q_proj', 'v_proj')) else 'mlp'}.{t}" for i in range(2) for t in targets]
            anchors = AlignmentAnchors.from_checkpoints(paths["aligned"], paths["base"], modules, projector=projector, k=k)  # type: ignore[arg-type]
            kinds = sorted({a.kind for a in anchors.anchors.values()})
            for scaling in (False, True):
                # one process (the reference), on every rank
                p_ref, ref_grads = _one_process_reference(paths, targets, anchors, scaling)
                # sharded
                model = lora_model(Path(paths["aligned"]), r=3, targets=targets)
                _seed_lora(model, 7)
                apply_fsdp2(model)
                bindings = bind_anchors(find_lora_targets(model), anchors)
                b0, a0 = bindings[0].target.lora_b, bindings[0].target.lora_a
                assert isinstance(b0, DTensor) and isinstance(a0, DTensor)
                reset_comm_bytes()
                parts, group = sharded_penalty_terms(bindings, scaling)
                local = torch.stack(parts).sum()
                whole = local.detach().clone()
                dist.all_reduce(whole, group=group)
                local.backward()
                sharded_grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if "lora_" in n}
                key = f"{projector}-{'scaled' if scaling else 'plain'}"
                results[key] = {
                    "kinds": kinds,
                    "p_ref": float(p_ref),
                    "p_sharded": float(whole),
                    "grad_rel_err": max(float((sharded_grads[n] - g).abs().max() / g.abs().max()) for n, g in ref_grads.items()),
                    "grad_names_equal": sorted(sharded_grads) == sorted(ref_grads),
                    "b_placements": [str(p) for p in b0.placements],
                    "b_local": list(b0.to_local().shape),
                    "b_global": list(b0.shape),
                    "a_local": list(a0.to_local().shape),
                    "a_global": list(a0.shape),
                    "grad_is_sharded": all(isinstance(p.grad, DTensor) for n, p in model.named_parameters() if "lora_" in n),
                    "anchor_rows": [list(b.anchor.rows or ()) for b in bindings],
                    "comm": dict(COMM_BYTES),
                }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_sharded_penalty_and_gradient_equal_one_process(setup: dict[str, Path], tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    paths = {k: str(v) for k, v in setup.items()}
    mp.spawn(_penalty_worker, args=(2, f"file://{tmp_path}/pg", paths, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert set(r0) == {"safe_lora-plain", "safe_lora-scaled", "topk-plain", "topk-scaled"}
    assert r0["safe_lora-plain"]["kinds"] == ["dense", "factor"] and r0["topk-plain"]["kinds"] == ["factor"]
    for key, a in r0.items():
        b = r1[key]
        assert a["p_ref"] > 0
        # both ranks see the whole penalty, equal to one process within float32 rounding
        for r in (a, b):
            assert r["p_sharded"] == pytest.approx(r["p_ref"], rel=1e-5)
            assert r["grad_names_equal"] and r["grad_rel_err"] < 1e-5, (key, r["grad_rel_err"])
            assert r["grad_is_sharded"]
        # really sharded: Shard(0) over 2 processes, half the rows of B; A (r=3) split 2 + 1
        assert a["b_placements"] == ["S(0)"] and a["b_global"] == [64, 3]
        assert a["b_local"] == [32, 3] and b["b_local"] == [32, 3]
        assert a["a_local"][0] == 2 and b["a_local"][0] == 1 and a["a_global"][0] == 3
        # each process holds its own rows of every anchor
        assert all(rows[:2] == [0, rows[2] // 2] for rows in a["anchor_rows"])
        assert all(rows[:2] == [rows[2] // 2, rows[2]] for rows in b["anchor_rows"])
        # one gather (+ one all_reduce for factor anchors) each way
        assert a["comm"]["forward"] > 0 and a["comm"]["backward"] > 0


# ---------------------------------------------------------------------------------------------
# The TRL script, the way users launch it
# ---------------------------------------------------------------------------------------------


def _asft_config(setup: dict[str, Path], tmp: Path, **over: Any) -> Path:
    """test_asft_example's config, with LoRA on four projections and batch 4 per process."""
    from test_asft_example import _config

    return _config(setup, tmp, **{"lora_target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
                                  "per_device_train_batch_size": 4, **over})


FSDP2 = ["--fsdp", "full_shard", "--fsdp_config", str(ROOT / "examples" / "fsdp2.json")]


def _launch(script: Path, args: list[str], cwd: Path, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@needs_accelerate
def test_asft_script_fsdp2_equals_one_process(setup: dict[str, Path], tmp_path: Path) -> None:
    """One process, batch 4 x 2 accumulation steps, vs FSDP2 over 2 processes, batch 4 each (and
    2 x 2 accumulation, which takes the no_sync path of a model sharded here): the same 8
    examples per optimiser step."""
    from safetensors.torch import load_file

    script = ROOT / "examples" / "train_asft.py"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cfg1 = _asft_config(setup, one, gradient_accumulation_steps=2)
    proc = subprocess.run([sys.executable, str(script), "--config", str(cfg1), "--output_dir", str(one / "out"),
                           "--summary_file", str(one / "s.json")], cwd=one, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the anchors are computed by the FSDP2 run itself (rank 0 writes the cache, the other reads its rows)
    cfg2 = _asft_config(setup, two)
    _launch(script, ["--config", str(cfg2), *FSDP2, "--output_dir", str(two / "out"), "--summary_file", str(two / "s.json")], two)
    a = json.loads((one / "s.json").read_text())
    b = json.loads((two / "s.json").read_text())
    assert a["engine"] == "single" and b["engine"] == "fsdp2" and b["world_size"] == 2
    sh = b["sharding"]  # recorded inside the first training step
    assert sh["lora_B"]["placements"] == ["S(0)"] and sh["lora_B"]["local_shape"][0] * 2 == sh["lora_B"]["global_shape"][0]
    assert sh["lora_A"]["local_shape"][0] * 2 == sh["lora_A"]["global_shape"][0]
    assert b["anchor_bytes"]["whole"] == a["anchor_bytes"]["whole"] and b["anchor_bytes"]["local"] * 2 == b["anchor_bytes"]["whole"]
    assert len(a["penalty"]) == len(b["penalty"]) == 4 and a["penalty"][-1] > 0
    for x, y in zip(a["penalty"], b["penalty"]):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-10)
    for x, y in zip(a["loss"], b["loss"]):
        assert y == pytest.approx(x, rel=1e-6)
    for name, v in a["drift"].items():
        assert b["drift"][name] == pytest.approx(v, rel=1e-5)
    wa, wb = load_file(str(one / "out" / "adapter_model.safetensors")), load_file(str(two / "out" / "adapter_model.safetensors"))
    assert sorted(wa) == sorted(wb) and len(wa) == 16
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7)
    # the penalty moved the adapter: the same run without it ends elsewhere (the check can fail)
    assert any(float((wa[k]).abs().max()) > 0 for k in wa if "lora_B" in k)


@needs_accelerate
def test_asft_script_fsdp2_with_accumulation(setup: dict[str, Path], tmp_path: Path) -> None:
    script = ROOT / "examples" / "train_asft.py"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cfg1 = _asft_config(setup, one, per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=3)
    proc = subprocess.run([sys.executable, str(script), "--config", str(cfg1), "--output_dir", str(one / "out"),
                           "--summary_file", str(one / "s.json")], cwd=one, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg2 = _asft_config(setup, two, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                        asft_anchors_path=str(one / "anchors.safetensors"))
    _launch(script, ["--config", str(cfg2), *FSDP2, "--output_dir", str(two / "out"), "--summary_file", str(two / "s.json")], two)
    a = json.loads((one / "s.json").read_text())
    b = json.loads((two / "s.json").read_text())
    assert b["engine"] == "fsdp2" and b["sharding"]["lora_B"]["placements"] == ["S(0)"]
    for x, y in zip(a["penalty"], b["penalty"], strict=True):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-10)
    for x, y in zip(a["loss"], b["loss"], strict=True):
        assert y == pytest.approx(x, rel=1e-6)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if "ConfigError" in ln or ln.startswith("hf_safety_merge.errors")]
    assert proc.returncode != 0 and lines, proc.stderr[-3000:]
    return lines[-1]


@needs_accelerate
def test_asft_refuses_fsdp1(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = _asft_config(setup, tmp_path)
    fsdp1 = tmp_path / "fsdp1.json"
    fsdp1.write_text(json.dumps({"version": 1}))
    proc = _launch(ROOT / "examples" / "train_asft.py", ["--config", str(cfg), "--fsdp", "full_shard", "--fsdp_config", str(fsdp1),
                   "--output_dir", str(tmp_path / "out")], tmp_path, check=False)
    line = _one_line_error(proc)
    assert "FSDP1" in line and "FSDP2" in line and "DDP" in line
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@needs_accelerate
def test_safekey_refuses_fsdp2_at_start(setup: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "sk.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"How do I do thing {i}?", "response": "I can't help with that. It is harmful.", "label": 1}) + "\n")
    cfg = tmp_path / "sk.yaml"
    cfg.write_text(yaml.safe_dump(dict(model_name_or_path=str(setup["aligned"]), dataset_name=str(data), max_steps=2,
                                       per_device_train_batch_size=2, use_cpu=True, report_to="none", max_length=32,
                                       save_strategy="no", disable_tqdm=True)))
    proc = _launch(ROOT / "examples" / "train_safekey.py", ["--config", str(cfg), *FSDP2, "--output_dir", str(tmp_path / "out")],
                   tmp_path, check=False)
    line = _one_line_error(proc)
    assert "SafeKey does not support FSDP2" in line and "DDP" in line
    assert "train_runtime" not in proc.stdout  # refused before training


def _distill_config(setup: dict[str, Path], tmp_path: Path, **extra: object) -> Path:
    """8 harmful rows and a distillation config (2 steps of 2 rows per process) writing tmp_path/vec."""
    data = tmp_path / "harm.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Tell me how to do bad thing {i}.", "completion": "Sure, here is how."}) + "\n")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump(dict(aligned_model=str(setup["aligned"]), data=str(data), vector_dir=str(tmp_path / "vec"),
                                       max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to="none", max_length=32,
                                       save_strategy="no", disable_tqdm=True, **extra)))
    return cfg


@needs_accelerate
def test_distill_refuses_fsdp2_at_start(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = _distill_config(setup, tmp_path)
    proc = _launch(ROOT / "examples" / "distill_safety_vector.py", ["--config", str(cfg), *FSDP2, "--output_dir", str(tmp_path / "out")],
                   tmp_path, check=False)
    assert not (tmp_path / "vec").exists()
    line = _one_line_error(proc)
    assert "distillation does not support FSDP2" in line and "DDP" in line
    assert "train_runtime" not in proc.stdout


@needs_accelerate
def test_distill_script_runs_on_ddp_two_processes(setup: dict[str, Path], tmp_path: Path) -> None:
    """Where distillation users shard (DDP: FSDP2 is refused above), the TrlParser script over two gloo
    processes: the optimiser steps see both ranks' batches and one finite, non-zero vector is written."""
    from hf_safety_merge.vectors import SafetyVector

    cfg = _distill_config(setup, tmp_path, summary_json=True, gradient_accumulation_steps=1)
    proc = _launch(ROOT / "examples" / "distill_safety_vector.py", ["--config", str(cfg), "--output_dir", str(tmp_path / "out")],
                   tmp_path)
    start = proc.stdout.index('{\n  "output_dir"')
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[start:])
    assert summary["steps"] == 2 and summary["effective_batch_size"] == 4  # 2 per process x 2 processes
    vec = SafetyVector.from_pretrained(tmp_path / "vec")
    norms = [float(vec[n].float().norm()) for n in vec]
    assert norms and all(math.isfinite(x) for x in norms) and max(norms) > 0
    vec.close()


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (it installs and runs on CPU with gloo)
# ---------------------------------------------------------------------------------------------

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (pip install .[deepspeed])")


def _zero3_worker(rank: int, world: int, port: int, paths: dict[str, str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from hf_safety_merge.training import AlignmentAnchors
    from hf_safety_merge.training.asft.peft_mixin import bind_anchors, find_lora_targets
    from hf_safety_merge.training.asft.zero3 import ZeroPenaltyModule

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict[str, Any] = {}
    try:
        targets = ("q_proj", "v_proj", "up_proj", "down_proj")
        modules = [f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'v_proj') else 'mlp'}.{t}" for i in range(2) for t in targets]
        anchors = AlignmentAnchors.from_checkpoints(paths["aligned"], paths["base"], modules)
        p_ref, ref_grads = _one_process_reference(paths, targets, anchors, True)

        model = lora_model(Path(paths["aligned"]), r=3, targets=targets)
        _seed_lora(model, 7)
        bindings = bind_anchors(find_lora_targets(model), anchors)
        pen = ZeroPenaltyModule(bindings, True, rank, world)
        model.add_module("asft_zero3_penalty", pen)
        params = [p for p in model.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=torch.optim.SGD(params, lr=0.1), config=config)
        b0 = bindings[0].target.lora_b
        local = pen()
        whole = local.detach().clone()
        dist.all_reduce(whole)
        engine.backward(world * local.sum())  # DeepSpeed averages over processes
        grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters() if "lora_" in n}
        results = {
            "p_ref": float(p_ref),
            "p_zero3": float(whole.sum()),
            "grad_rel_err": max(float((grads[n] - g).abs().max() / g.abs().max()) for n, g in ref_grads.items()),
            "names_equal": sorted(grads) == sorted(ref_grads),
            "ds_status": str(b0.ds_status),
            "data_shape": list(b0.data.shape),
            "ds_shape": list(b0.ds_shape),
            "partition": list(b0.ds_tensor.shape),
            "anchor_rows": [list(b.anchor.rows or ()) for b in bindings],
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@needs_deepspeed
def test_zero3_penalty_gradient_equals_one_process(setup: dict[str, Path], tmp_path: Path) -> None:
    """The penalty alone through a DeepSpeed ZeRO-3 engine (LoRA weights partitioned, anchors
    sharded by rows): value and every LoRA gradient (DeepSpeed's reduced, gathered gradient)
    equal to one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    paths = {k: str(v) for k, v in setup.items()}
    mp.spawn(_zero3_worker, args=(2, port, paths, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["p_ref"] > 0 and r["p_zero3"] == pytest.approx(r["p_ref"], rel=1e-5)
        assert r["names_equal"] and r["grad_rel_err"] < 1e-5, r["grad_rel_err"]
        # partitioned outside the forward pass: no data, a flat partition of half the elements
        assert r["ds_status"].endswith("NOT_AVAILABLE") and r["data_shape"] == [0]
        assert r["ds_shape"] == [64, 3] and r["partition"] == [96]
        half = [[0, 32, 64], [32, 64, 64]][rank]
        assert all(rows == half for rows in r["anchor_rows"] if rows[2] == 64)


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "zero_allow_untested_optimizer": True}


@needs_deepspeed
@needs_accelerate
def test_asft_script_zero3(setup: dict[str, Path], tmp_path: Path) -> None:
    """The TRL script under `--deepspeed` ZeRO-3 on 2 CPU processes: the weights are partitioned
    during the step, anchors halved, and the run follows one process. DeepSpeed's own task path
    is not bit-equal to one process (measured, docs/asft.md: with the same batches the first
    loss differs by 2e-5 relative and the penalty after the first step, which only the task
    gradient moves, by 5e-4), so this compares within 3e-3; the AsFT part is exact
    (test_zero3_penalty_gradient_equals_one_process)."""
    script = ROOT / "examples" / "train_asft.py"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cfg1 = _asft_config(setup, one, gradient_accumulation_steps=2, train_sampling_strategy="sequential")
    proc = subprocess.run([sys.executable, str(script), "--config", str(cfg1), "--output_dir", str(one / "out"),
                           "--summary_file", str(one / "s.json")], cwd=one, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ds = two / "zero3.json"
    ds.write_text(json.dumps(ZERO3))
    cfg2 = _asft_config(setup, two, asft_anchors_path=str(one / "anchors.safetensors"), train_sampling_strategy="sequential")
    _launch(script, ["--config", str(cfg2), "--deepspeed", str(ds), "--output_dir", str(two / "out"), "--summary_file", str(two / "s.json")], two)
    a = json.loads((one / "s.json").read_text())
    b = json.loads((two / "s.json").read_text())
    assert b["engine"] == "deepspeed-zero3" and b["world_size"] == 2
    sh = b["sharding"]
    assert sh["lora_B"]["ds_status"].endswith("NOT_AVAILABLE") and sh["lora_B"]["data_shape_outside_forward"] == [0]
    assert b["anchor_bytes"]["local"] * 2 == b["anchor_bytes"]["whole"] == a["anchor_bytes"]["whole"]
    for x, y in zip(a["penalty"][1:], b["penalty"][1:], strict=True):
        assert y == pytest.approx(x, rel=3e-3)
    for x, y in zip(a["loss"], b["loss"], strict=True):
        assert y == pytest.approx(x, rel=1e-4)
    assert (two / "out" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# The Python API: AsFTTrainer over a model the user sharded with fully_shard
# ---------------------------------------------------------------------------------------------


def _api_run(paths: dict[str, str], out: Path, sharded: bool, **over: Any) -> dict[str, Any]:
    from datasets import load_dataset
    from test_asft_training import make_tokenizer, train_args

    from hf_safety_merge.training import AsFTConfig, AsFTTrainer
    from hf_safety_merge.training.sharding import apply_fsdp2

    model = lora_model(Path(paths["aligned"]), r=4, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    if sharded:
        apply_fsdp2(model)  # the user's own fully_shard, before the trainer
    opts: dict[str, Any] = dict(asft_lambda=5.0, asft_base_model=paths["base"], asft_aligned_model=paths["aligned"],
                                asft_anchors_path=paths["anchors"], optim="sgd", learning_rate=0.5, max_steps=3,
                                train_sampling_strategy="sequential")
    opts.update(over)
    trainer = AsFTTrainer(model=model, args=train_args(AsFTConfig, out, **opts),
                          train_dataset=load_dataset(paths["data"], split="train"), processing_class=make_tokenizer())
    trainer.train()
    hist = trainer.state.log_history
    return {"engine": trainer.training_engine, "sharding": trainer.asft_sharding,
            "penalty": [h["asft/penalty"] for h in hist if "asft/penalty" in h], "loss": [h["loss"] for h in hist if "loss" in h],
            "drift": trainer.asft_drift()}


def _api_worker(rank: int, world: int, port: int, paths: dict[str, str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        r = _api_run(paths, Path(out) / f"run{rank}", True, per_device_train_batch_size=2)
        if rank == 0:
            Path(out, "api.json").write_text(json.dumps(r))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_python_api_asft_trainer_on_a_fully_sharded_model(setup: dict[str, Path], tmp_path: Path) -> None:
    """`AsFTTrainer(model=fully_shard(peft_model), ...)` on 2 processes (no --fsdp flag: the
    trainer finds the DTensor weights, does not wrap them in DDP, shards its anchors) equals one
    process with the same examples per step."""
    import socket

    import torch.multiprocessing as mp

    from hf_safety_merge.training import AlignmentAnchors

    anchors = tmp_path / "anchors.safetensors"
    mods = [f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'v_proj') else 'mlp'}.{t}" for i in range(2)
            for t in ("q_proj", "v_proj", "up_proj", "down_proj")]
    AlignmentAnchors.from_checkpoints(setup["aligned"], setup["base"], mods).save(anchors)
    paths = {**{k: str(v) for k, v in setup.items()}, "anchors": str(anchors)}
    one = _api_run(paths, tmp_path / "one", False, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_api_worker, args=(2, port, paths, str(tmp_path)), nprocs=2, join=True)
    two = json.loads((tmp_path / "api.json").read_text())
    assert one["engine"] == "single" and two["engine"] == "fsdp2"
    assert two["sharding"]["lora_B"]["placements"] == ["S(0)"] and two["sharding"]["anchor_bytes"]["local"] * 2 == two["sharding"]["anchor_bytes"]["whole"]
    assert len(one["penalty"]) == len(two["penalty"]) == 3 and one["penalty"][-1] > 0
    for x, y in zip(one["penalty"] + one["loss"], two["penalty"] + two["loss"], strict=True):
        assert y == pytest.approx(x, rel=1e-5, abs=1e-10)
    for k, v in one["drift"].items():
        assert two["drift"][k] == pytest.approx(v, rel=1e-5)
