"""`examples/train_asft.py` end to end: TrlParser + YAML config, one process and
`accelerate launch --num_processes 2` (CPU, gloo), which must log the same penalty."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_asft_training import make_tiny_setup

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_asft.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_setup(tmp_path_factory.mktemp("asft-example"))


def _config(setup: dict[str, Path], tmp: Path, **over: Any) -> Path:
    cfg: dict[str, Any] = dict(
        model_name_or_path=str(setup["aligned"]),
        asft_base_model=str(setup["base"]),
        asft_anchors_path=str(tmp / "anchors.safetensors"),
        asft_lambda=5.0,
        dataset_name=str(setup["data"] / "train.jsonl"),
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,  # dropout draws different random numbers per rank
        lora_target_modules=["q_proj", "v_proj"],
        max_steps=4,
        per_device_train_batch_size=8,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=32,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    cfg.update(over)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_example_single_process(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = _config(setup, tmp_path)
    out = tmp_path / "out"
    _run([sys.executable, str(SCRIPT), "--config", str(cfg), "--output_dir", str(out), "--summary_file", str(tmp_path / "s.json")], tmp_path)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["world_size"] == 1 and s["steps"] == 4
    assert len(s["penalty"]) == 4 and s["penalty"][0] == 0.0 and s["penalty"][-1] > 0
    assert len(s["drift"]) == 4 and all(v > 0 for v in s["drift"].values())  # 2 layers x q/v
    assert (tmp_path / "anchors.safetensors").is_file()  # anchors computed once and cached
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_example_flag_errors(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--asft_projector", "svd"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "asft_projector" in proc.stderr


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="accelerate CLI not installed")
def test_accelerate_two_processes_log_the_same_penalty(setup: dict[str, Path], tmp_path: Path) -> None:
    """DDP over 2 CPU processes (gloo), 4 examples each, vs one process with 4 examples x 2
    gradient-accumulation steps: the same 8 examples per optimiser step, the same padding per
    micro-batch, and (measured) bit-identical penalty and loss trajectories. (One process with
    batch 8 pads the 8 examples together, which moves the penalty by ~7e-4 relative after one SGD
    step: a padding effect of the model, not of AsFT; `--padding_free` removes it too.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    cfg1 = _config(setup, one, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    _run([sys.executable, str(SCRIPT), "--config", str(cfg1), "--output_dir", str(one / "out"), "--summary_file", str(one / "s.json")], one)
    cfg2 = _config(setup, two, per_device_train_batch_size=4)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "0", str(SCRIPT), "--config", str(cfg2), "--output_dir", str(two / "out"),
          "--summary_file", str(two / "s.json")], two)
    a = json.loads((one / "s.json").read_text())
    b = json.loads((two / "s.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert len(a["penalty"]) == len(b["penalty"]) == 4 and a["penalty"][-1] > 0
    for x, y in zip(a["penalty"], b["penalty"]):
        assert y == pytest.approx(x, rel=1e-6, abs=1e-10)
    for x, y in zip(a["loss"], b["loss"]):
        assert y == pytest.approx(x, rel=1e-6)
