"""`examples/train_safekey.py` end to end (TrlParser + `--config` YAML, one process, tiny model, offline),
and `examples/safekey_config.yaml` parses into the reference setup."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_example_single_process(tmp_path: Path) -> None:
    from hf_safety_merge.distill.testing import make_tiny_chat_model

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
    cfg: dict[str, Any] = dict(
        model_name_or_path=str(model), dataset_name=str(data), safekey_last_k_epochs=1, safekey_save_heads=True,
        num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to="none", max_length=128, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(tmp_path / "c.yaml"), "--output_dir", str(out),
         "--summary_file", str(tmp_path / "s.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["steps"] == 4 and s["aux_active"] == [0, 0, 1, 1]  # 2 steps per epoch, the last epoch only
    assert len(s["head_loss"]) == len(s["qmm_loss"]) == 2
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == s
    assert (out / "model.safetensors").is_file() and (out / "safekey_heads.safetensors").is_file()
