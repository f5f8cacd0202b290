"""Training killed mid-way (SIGKILL) resumes from its last checkpoint to the same final weights as
an uninterrupted run, bit for bit on CPU: data order, RNG (LoRA dropout), the optimiser and
schedule state (AsFT's per-epoch decay across an epoch boundary)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_asft_training import make_tiny_setup

ROOT = Path(__file__).resolve().parents[1]

#: runs `hf_safety_merge.scripts.<module>` and SIGKILLs its own process at the end of optimiser
#: step KILL_AT_STEP (a scheduler's kill, OOM killer: no clean-up runs)
KILLER = '''
import os, signal, sys
import transformers
from transformers import TrainerCallback

kill_at = int(os.environ["KILL_AT_STEP"])

class _Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

_init = transformers.Trainer.__init__
def _patched(self, *a, **k):
    _init(self, *a, **k)
    self.add_callback(_Kill())
transformers.Trainer.__init__ = _patched

import importlib
script = importlib.import_module("hf_safety_merge.scripts." + os.environ["SCRIPT"])
sys.exit(script.run(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_setup(tmp_path_factory.mktemp("resume"))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, folder
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def _kill_and_resume(script: str, example: Path, cfg: Path, tmp: Path, kill_at: int, checkpoint: int) -> tuple[Path, Path]:
    full, part = tmp / "full", tmp / "part"
    proc = _run([str(example), "--config", str(cfg), "--output_dir", str(full)], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    killer = tmp / "killer.py"
    killer.write_text(KILLER)
    proc = _run([str(killer), "--config", str(cfg), "--output_dir", str(part)], tmp, KILL_AT_STEP=str(kill_at), SCRIPT=script)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    ckpts = sorted(int(p.name.split("-")[1]) for p in part.glob("checkpoint-*"))
    assert ckpts[-1] == checkpoint, ckpts  # killed after it, before the next one
    proc = _run([str(example), "--config", str(cfg), "--output_dir", str(part), "--resume_from_checkpoint",
                 str(part / f"checkpoint-{checkpoint}")], tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return full, part


def test_asft_resumes_bit_identical(setup: dict[str, Path], tmp_path: Path) -> None:
    """64 examples, batch 8: 8 steps per epoch, 2 epochs; AdamW, LoRA dropout, the reference's
    per-epoch decay; checkpoints every 5 steps, killed at step 11 (after checkpoint-10, in the
    second epoch), resumed."""
    cfg: dict[str, Any] = dict(
        model_name_or_path=str(setup["aligned"]), asft_base_model=str(setup["base"]),
        asft_anchors_path=str(tmp_path / "anchors.safetensors"), asft_lambda=5.0, asft_lr_decay_per_epoch=0.5,
        dataset_name=str(setup["data"] / "train.jsonl"), lora_r=4, lora_alpha=8, lora_dropout=0.1,
        lora_target_modules=["q_proj", "v_proj"], num_train_epochs=2, per_device_train_batch_size=8,
        optim="adamw_torch", learning_rate=0.01, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="steps", save_steps=5, report_to="none", max_length=32, use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full, part = _kill_and_resume("asft", ROOT / "examples" / "train_asft.py", path, tmp_path, kill_at=11, checkpoint=10)
    a, b = _weights(full), _weights(part)
    assert [k for k in a if "adapter_model" in k] and sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = json.loads((part / "checkpoint-15" / "trainer_state.json").read_text())
    assert state["global_step"] == 15 and state["epoch"] > 1  # the resumed run went on into epoch 2


def test_safekey_resumes_bit_identical(tmp_path: Path) -> None:
    """8 examples, batch 2: 4 steps per epoch, 3 epochs, the auxiliary losses in the last one
    (the epoch window); AdamW with its own head groups; checkpoints every 4 steps, killed at step
    10 (after checkpoint-8, inside the window), resumed: the model and the heads equal the
    uninterrupted run's."""
    from test_safekey_example import _setup

    model, data = _setup(tmp_path)
    cfg: dict[str, Any] = dict(
        model_name_or_path=str(model), dataset_name=str(data), safekey_last_k_epochs=1, safekey_save_heads=True,
        num_train_epochs=3, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1, save_strategy="steps",
        save_steps=4, report_to="none", max_length=128, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    full, part = _kill_and_resume("safekey", ROOT / "examples" / "train_safekey.py", path, tmp_path, kill_at=10, checkpoint=8)
    a, b = _weights(full), _weights(part)
    assert any(k.startswith("safekey_heads") for k in a) and any(k.startswith("model") for k in a)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_distillation_resumes_bit_identical(tmp_path: Path) -> None:
    """The distillation script killed at step 4 (after checkpoint-3) and resumed with
    `--resume_from_checkpoint`: the safety vector equals the uninterrupted run's, and the harmful
    model is written whole or not at all."""
    from hf_safety_merge.testing.distill import make_tiny_chat_model

    rows = [{"prompt": f"How do I do harmful thing {i}?", "completion": f"Sure, step one is {i}, then step two."} for i in range(16)]
    data = tmp_path / "harm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = make_tiny_chat_model(tmp_path / "aligned", "llama", texts=[r["prompt"] + r["completion"] for r in rows],
                                 hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    cfg = tmp_path / "d.yaml"
    cfg.write_text(yaml.safe_dump(dict(aligned_model=str(model), data=str(data), max_steps=8, per_device_train_batch_size=2,
                                       learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1, save_strategy="steps",
                                       save_steps=3, report_to="none", max_length=64, use_cpu=True, seed=0,
                                       dataloader_num_workers=0, disable_tqdm=True, logging_steps=1)))
    example = ROOT / "examples" / "distill_safety_vector.py"
    full = _run([str(example), "--config", str(cfg), "--output_dir", str(tmp_path / "run-full"), "--vector_dir", str(tmp_path / "v-full"),
                 "--save_harmful_model", str(tmp_path / "h-full")], tmp_path)
    assert full.returncode == 0, full.stderr[-4000:]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    part = [str(killer), "--config", str(cfg), "--output_dir", str(tmp_path / "run"), "--vector_dir", str(tmp_path / "v"),
            "--save_harmful_model", str(tmp_path / "h")]
    proc = _run(part, tmp_path, KILL_AT_STEP="4", SCRIPT="distill")
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    assert not (tmp_path / "v").exists() and not (tmp_path / "h").exists()  # nothing half-written
    proc = _run([str(example), *part[1:], "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-3")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _weights(tmp_path / "v-full"), _weights(tmp_path / "v")
    assert a and sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha, hb = _weights(tmp_path / "h-full"), _weights(tmp_path / "h")
    assert ha and all(torch.equal(ha[k], hb[k]) for k in ha)
