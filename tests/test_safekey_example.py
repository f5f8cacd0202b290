"""`examples/train_safekey.py` end to end (TrlParser + `--config` YAML, one process, tiny model, offline),
and `examples/safekey_config.yaml` parses into the reference setup."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_safekey.py"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("train_safekey", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through it
    spec.loader.exec_module(mod)
    return mod


def test_reference_config_parses(tmp_path: Path) -> None:
    script, cfg, model = _module().make_parser().parse_args_and_config(
        args=["--config", str(ROOT / "examples" / "safekey_config.yaml"), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    assert (cfg.safekey_head_weight, cfg.safekey_qmm_weight, cfg.safekey_head_theta, cfg.safekey_last_k_epochs) == (0.2, 0.2, 0.5, 2)
    assert cfg.num_train_epochs == 5 and cfg.learning_rate == 1e-5 and (cfg.adam_beta1, cfg.adam_beta2) == (0.9, 0.95)
    assert cfg.weight_decay == 1e-4 and cfg.warmup_steps == 0.05 and cfg.lr_scheduler_type == "cosine"
    assert cfg.safekey_save_heads and not cfg.safekey_detach_head_inputs
    assert model.attn_implementation == "sdpa" and script.dataset_name.endswith(".jsonl")
    # the reference's effective batch (2 per GPU x 8 accumulation steps x 8 GPUs), length, seed, and
    # fp32 master weights with bf16 compute (DeepSpeed bf16)
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 128
    assert cfg.max_length == 8192 and cfg.seed == 2002 and cfg.gradient_checkpointing
    assert model.dtype == "float32" and cfg.bf16
    assert cfg.safekey_qmm_mode == "auto"
    # one global gradient norm over the model and the heads, as the reference's DeepSpeed engine clips them
    assert cfg.safekey_clip_heads_with_model and cfg.max_grad_norm == 1.0


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    from hf_safety_merge.testing.distill import make_tiny_chat_model

    recs = [
        {"prompt": f"How do I {t}?", "label": h,
         "response": f"<think>The user asks how to {t}. {'This could hurt someone.' if h else 'This is harmless.'} Then answer.</think>"
                     f"{'No.' if h else 'Sure.'}"}
        for t, h in [("pick a lock", 1), ("bake bread", 0), ("make a fake ID", 1), ("plant tomatoes", 0)] * 2
    ]
    model = make_tiny_chat_model(tmp_path / "model", "llama", texts=[r["prompt"] + r["response"] for r in recs],
                                 hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return model, data


def _config(model: Path, data: Path, path: Path, **over: Any) -> Path:
    cfg: dict[str, Any] = dict(
        model_name_or_path=str(model), dataset_name=str(data), safekey_last_k_epochs=1, safekey_save_heads=True,
        num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to="none", max_length=128, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_example_single_process(tmp_path: Path) -> None:
    model, data = _setup(tmp_path)
    cfg = _config(model, data, tmp_path / "c.yaml")
    out = tmp_path / "out"
    _run([sys.executable, str(SCRIPT), "--config", str(cfg), "--output_dir", str(out), "--summary_file", str(tmp_path / "s.json")],
         tmp_path)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["steps"] == 4 and s["aux_active"] == [0, 0, 1, 1]  # 2 steps per epoch, the last epoch only
    assert len(s["head_loss"]) == len(s["qmm_loss"]) == 2
    assert (out / "model.safetensors").is_file() and (out / "safekey_heads.safetensors").is_file()


@pytest.mark.skipif(shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None, reason="accelerate CLI not installed")
@pytest.mark.parametrize("joint_clip", [False, True])
def test_accelerate_two_processes_match_gradient_accumulation(tmp_path: Path, joint_clip: bool) -> None:
    """DDP over 2 CPU processes (gloo), batch 2 each, vs one process with batch 2 x 2 accumulation
    steps: the same micro-batches, so the same losses, SafeKey metrics and trained heads (whose
    gradients the trainer averages over processes itself: they are outside the DDP model). With
    `safekey_clip_heads_with_model` and a clip that bites, the heads' gradients must be averaged
    before the joint norm, or the two runs part."""
    model, data = _setup(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    clip: dict[str, Any] = {"safekey_clip_heads_with_model": True, "max_grad_norm": 0.01} if joint_clip else {}
    cfg1 = _config(model, data, one / "c.yaml", per_device_train_batch_size=2, gradient_accumulation_steps=2, **clip)
    _run([sys.executable, str(SCRIPT), "--config", str(cfg1), "--output_dir", str(one / "out"), "--summary_file", str(one / "s.json")], one)
    cfg2 = _config(model, data, two / "c.yaml", per_device_train_batch_size=2, **clip)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "0", str(SCRIPT), "--config", str(cfg2), "--output_dir", str(two / "out"),
          "--summary_file", str(two / "s.json")], two)
    a = json.loads((one / "s.json").read_text())
    b = json.loads((two / "s.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2 and a["steps"] == b["steps"] == 4
    for key in ("loss", "sft_loss", "head_loss", "qmm_loss", "aux_active"):
        assert len(a[key]) == len(b[key]) > 0, key
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert b["heads_sq_norm"] == pytest.approx(a["heads_sq_norm"], rel=1e-6)
