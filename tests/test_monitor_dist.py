"""The safety monitor on 2 CPU processes (gloo), real Trainer steps on tiny random models.

- DDP (`torchrun`, TRL `SFTTrainer`, full fine-tune, gradient checkpointing on): every rank
  generates its half of the probes on its own replica, the main process judges, the point is
  broadcast; the `stop` policy ends training on both ranks at the same step when the paired test
  fires; gradient checkpointing and train mode are restored after every probe.
- FSDP2 (the AsFT TRL script under `accelerate launch --fsdp ... version 2`, a LoRA model, the
  `--safety_monitor_*` flags): the weights are DTensors sharded `Shard(0)` during the steps and the
  probes; all ranks generate with `synced_gpus`; `keep_safest` saves a gathered checkpoint; the
  card section is written. Neither run deadlocks (a 300 s timeout per launch).
- DDP with a user's generation backend and the `patch` policy: only the main process builds the
  backend and generates, the other rank waits for the broadcast point; the main process writes the
  repaired copy (RESTA: trained + beta * vector, checked tensor by tensor) and every rank learns
  where it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TORCHRUN = Path(sys.executable).parent / "torchrun"
needs_launchers = pytest.mark.skipif(shutil.which("accelerate", path=str(ACCELERATE.parent)) is None
                                     or shutil.which("torchrun", path=str(TORCHRUN.parent)) is None,
                                     reason="accelerate / torchrun CLI not installed")

HARMFUL = [f"the {a} {v} {p} the {n}" for a, v, p, n in [
    ("cat", "sat", "on", "mat"), ("dog", "ran", "under", "tree"), ("bird", "flew", "over", "sea"),
    ("fish", "swam", "near", "river"), ("cat", "ran", "over", "hill"), ("dog", "sat", "near", "house"),
    ("bird", "sat", "on", "tree"), ("fish", "flew", "under", "moon"), ("cat", "swam", "on", "river"),
    ("dog", "flew", "near", "star"), ("bird", "ran", "under", "cloud"), ("fish", "sat", "over", "garden")]]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# ---------------------------------------------------------------------------------------------
# The DDP worker (run by torchrun: `python tests/test_monitor_dist.py ddp SETUP OUT`)
# ---------------------------------------------------------------------------------------------


def _ddp_worker(setup: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from test_asft_training import make_texts
    from test_monitor import ChangedJudge
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from hf_safety_merge.monitor import SafetyMonitorCallback

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(setup)
    model = AutoModelForCausalLM.from_pretrained(setup, dtype=torch.float32)
    args = SFTConfig(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, learning_rate=3e-2,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     max_length=32, gradient_checkpointing=True, seed=0, data_seed=0, disable_tqdm=True,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(make_texts(96)), processing_class=tok)
    seen: dict[str, Any] = {"step_modes": []}

    class Watch(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 0:
                return  # the model is in train mode from the first training_step on
            m = trainer.model
            seen["step_modes"].append([bool(m.training), bool(m.is_gradient_checkpointing),
                                       type(trainer.model_wrapped).__name__, trainer.processing_class.padding_side])

    trainer.add_callback(Watch())
    monitor = SafetyMonitorCallback(steps=2, policy="stop", judge=ChangedJudge(), harmful=HARMFUL, benign=HARMFUL[:3],
                                    max_new_tokens=6, batch_size=4, threshold_points=10.0, trainer=trainer)
    trainer.train()
    rank = dist.get_rank()
    res = {"rank": rank, "global_step": trainer.state.global_step, "curve": monitor.curve,
           "logged": [{k: v for k, v in h.items() if k.startswith("safety/") or k == "step"} for h in trainer.state.log_history
                      if "safety/unsafe_rate" in h], **seen}
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _ddp_backend_patch_worker(setup: Path, vector: Path, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from test_asft_training import make_texts
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from hf_safety_merge.eval.backends import TransformersBackend
    from hf_safety_merge.monitor import SafetyMonitorCallback

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(setup)
    model = AutoModelForCausalLM.from_pretrained(setup, dtype=torch.float32)
    args = SFTConfig(output_dir=str(out / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-2,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     max_length=32, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(make_texts(64)), processing_class=tok)
    built: list[int] = []

    def backend(m: Any, t: Any) -> Any:  # a user's backend: here the plain transformers one
        built.append(dist.get_rank())
        return TransformersBackend(m, t)

    monitor = SafetyMonitorCallback(steps=2, policy="patch", safety_vector=str(vector), patch_method="task_arithmetic",
                                    patch_parameters={"beta": 0.5}, judge="keyword", harmful=HARMFUL[:6], benign=None,
                                    max_new_tokens=4, backend=backend, trainer=trainer, print_table=False)
    trainer.train()
    rank = dist.get_rank()
    res = {"rank": rank, "built": built, "curve": monitor.curve, "patched_dir": str(monitor.patched_dir),
           "patch_error": monitor.patch_error}
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_asft_training import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("monitor_dist"))


@needs_launchers
def test_ddp_stop_policy_gradient_checkpointing(setup: dict[str, Path], tmp_path: Path) -> None:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", __file__, "ddp", str(setup["aligned"]), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # both ranks stopped at the same step, before max_steps, on the same eroded point
    assert r0["global_step"] == r1["global_step"] < 12
    last = r0["curve"][-1]
    stop = next(p for p in r0["curve"] if p.get("stopped"))
    assert stop["eroded"] and stop["p_value"] < 0.05 and stop["delta_points"] > 10
    assert stop["step"] == r0["global_step"] and last["label"] == "end"
    assert [p["step"] for p in r0["curve"]] == [p["step"] for p in r1["curve"]]
    assert r0["curve"][0]["label"] == "start" and r0["curve"][0]["unsafe"]["k"] == 0
    # every rank generated its half (data-parallel) and logged the same points through Trainer.log
    assert all(p["engine"] == "data-parallel x2" and p["world_size"] == 2 for p in r0["curve"])
    assert r0["logged"] == r1["logged"] and len(r0["logged"]) == len(r0["curve"])
    assert {"safety/unsafe_rate_low", "safety/unsafe_rate_high", "safety/over_refusal"} <= set(r0["logged"][0])
    # after every probe: train mode, gradient checkpointing, DDP wrapping and the tokenizer's padding side intact
    for r in (r0, r1):
        assert r["step_modes"] and all(m == [True, True, "DistributedDataParallel", r["step_modes"][0][3]] for m in r["step_modes"])
    assert "Safety monitor" in proc.stdout and "(start)" in proc.stdout


@needs_launchers
def test_ddp_user_backend_on_main_and_patch(setup: dict[str, Path], tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from hf_safety_merge.vectors import SafetyVector

    vec = tmp_path / "vector"
    SafetyVector.compute(setup["aligned"], setup["base"], vec, progress=False)
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", __file__, "ddp_backend_patch", str(setup["aligned"]),
           str(vec), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # the backend was built (and generated) on the main process only, once per probe: start, 2, 4
    assert r0["built"] == [0, 0, 0] and r1["built"] == []
    assert [p["step"] for p in r0["curve"]] == [p["step"] for p in r1["curve"]] == [0, 2, 4]
    assert all(p["engine"] == "backend on main" and p["unsafe"]["n"] == 6 for p in r0["curve"])
    assert [p["unsafe"]["k"] for p in r0["curve"]] == [p["unsafe"]["k"] for p in r1["curve"]]
    # patch: written once by the main process, known to both ranks, RESTA tensor by tensor
    assert r0["patch_error"] is None and r1["patch_error"] is None
    patched_dir = Path(str(tmp_path / "run") + "-patched")
    assert r0["patched_dir"] == r1["patched_dir"] == str(patched_dir)
    trained = load_file(tmp_path / "run" / "monitor-final" / "model.safetensors")
    patched = load_file(patched_dir / "model.safetensors")
    delta = load_file(next(vec.glob("*.safetensors")))
    assert set(patched) == set(trained)
    checked = 0
    for k, w in trained.items():
        if k in delta:
            torch.testing.assert_close(patched[k], w + 0.5 * delta[k], rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > 0
    assert not any(tmp_path.glob("run-patched*.tmp*")), "a half-written copy was left"


@needs_launchers
def test_asft_script_fsdp2_sharded_probe(setup: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    harm = tmp_path / "harmful.jsonl"
    harm.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL))
    cfg = dict(model_name_or_path=str(setup["aligned"]), asft_base_model=str(setup["base"]),
               asft_anchors_path=str(tmp_path / "anchors.safetensors"), asft_lambda=1.0,
               dataset_name=str(setup["data"] / "train.jsonl"), lora_r=4, lora_alpha=8, lora_dropout=0.0,
               lora_target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], max_steps=4, per_device_train_batch_size=4,
               optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
               report_to="none", max_length=32, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
               safety_monitor_steps=2, safety_monitor_policy="keep_safest", safety_monitor_judge="keyword",
               safety_monitor_harmful=str(harm), safety_monitor_harmful_size=12, safety_monitor_benign="none",
               safety_monitor_max_new_tokens=6)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", str(ROOT / "examples" / "train_asft.py"),
           "--config", str(tmp_path / "c.yaml"), "--fsdp", "full_shard", "--fsdp_config", str(ROOT / "examples" / "fsdp2.json"),
           "--output_dir", str(tmp_path / "out"), "--summary_file", str(tmp_path / "s.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["engine"] == "fsdp2" and s["world_size"] == 2
    # really sharded during the step: LoRA B is a DTensor, Shard(0), half the rows per process
    sh = s["sharding"]
    assert sh["lora_B"]["placements"] == ["S(0)"] and sh["lora_B"]["local_shape"][0] * 2 == sh["lora_B"]["global_shape"][0]
    mon = s["safety_monitor"]
    pts = mon["points"]
    assert [p["step"] for p in pts] == [0, 2, 4] and [p["label"] for p in pts] == ["start", "step", "end"]
    assert all(p["engine"] == "fsdp2 sharded x2" for p in pts)
    assert all(p["unsafe"]["n"] == 12 for p in pts)
    # each probe ran on the sharded model: a DTensor, Shard(0), half the rows in each process
    for p in pts:
        assert p["sharding"]["placements"] == ["S(0)"], p
        assert p["sharding"]["local_shape"][0] * 2 == p["sharding"]["global_shape"][0]
    assert mon["safest_dir"] and (Path(mon["safest_dir"]) / "adapter_model.safetensors").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Safety during training" in card and "| 4 (end) |" in card
    curve = json.loads((tmp_path / "out" / "safety_monitor.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 2, 4]


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        _ddp_worker(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "ddp_backend_patch":
        _ddp_backend_patch_worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
