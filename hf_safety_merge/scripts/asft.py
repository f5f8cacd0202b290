# Copyright the hf-safety-merge authors. Apache-2.0.
"""AsFT: safety-anchored LoRA fine-tuning, as a TRL-style script.

Every `SFTConfig` / `ModelConfig` flag of TRL's `sft.py` works, plus the `--asft_*` flags of
`AsFTConfig` (see `docs/asft.md`). AsFT trains LoRA adapters, so `--use_peft` is implied.

```bash
# one process
hf-safety-merge asft --config examples/asft_config.yaml

# the same, flags only: fine-tune the *aligned* model, anchored to W_aligned - W_base
hf-safety-merge asft \
    --model_name_or_path path/or/hub-id-of-aligned-model \
    --asft_base_model path/or/hub-id-of-its-unaligned-base \
    --asft_anchors_path anchors.safetensors \
    --asft_lambda 1.0 \
    --dataset_name trl-lib/Capybara \
    --lora_r 8 --lora_alpha 32 --lora_target_modules q_proj v_proj \
    --learning_rate 5e-5 --num_train_epochs 10 --per_device_train_batch_size 8 \
    --output_dir out-asft

# several processes (DDP; on CPU the gloo backend is used)
accelerate launch --num_processes 2 examples/train_asft.py --config examples/asft_config.yaml

# FSDP2: weights, LoRA adapters and AsFT's anchors sharded over the processes
accelerate launch --num_processes 2 examples/train_asft.py --config examples/asft_config.yaml \
    --fsdp full_shard --fsdp_config examples/fsdp2.json
```

The last line the main process prints is a JSON summary (final task loss, penalty, the per-module
off-basin drift of the trained adapters) that scripts and tests can read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import (
    SafetyMonitorArguments,
    attach_monitor,
    load_script_data,
    monitor_config,
    monitor_summary,
    publish_summary,
    run_trl_script,
)

logger = logging.getLogger("train_asft")


@dataclass
class AsFTScriptArguments(SafetyMonitorArguments):
    """Data arguments (the fields of `trl.ScriptArguments`, plus a local-file shortcut)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub data set id or a local folder/file loadable by `datasets.load_dataset`."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Data set configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (if eval_strategy != 'no')."})
    summary_file: str | None = field(default=None, metadata={"help": "Also write the JSON summary to this file."})


def load_data(args: Any) -> Any:
    """`--dataset_name` loaded with `datasets.load_dataset` (see `hf_safety_merge.scripts.load_script_data`)."""
    return load_script_data(args, "asft")


def main(script_args: AsFTScriptArguments, training_args: Any, model_args: Any) -> dict[str, Any]:
    from trl import get_peft_config

    from hf_safety_merge.training import AsFTTrainer

    if not model_args.use_peft:
        logger.info("AsFT trains LoRA adapters: --use_peft is implied")
        model_args.use_peft = True
    monitor_config(script_args)  # bad --safety_monitor_* flags fail here, before any model is loaded
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    if training_args.asft_aligned_model is None:
        # AsFT fine-tunes the aligned model itself: W_aligned is the model being trained.
        training_args.asft_aligned_model = model_args.model_name_or_path

    dataset = load_data(script_args)
    trainer = AsFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    monitor = attach_monitor(trainer, script_args)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    history = trainer.state.log_history
    summary = {
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "world_size": trainer.accelerator.num_processes,
        "penalty": [h["asft/penalty"] for h in history if "asft/penalty" in h],
        "loss": [h["loss"] for h in history if "loss" in h],
        "drift": trainer.asft_drift(),
        "engine": trainer.training_engine,
        # what the first training step saw: DTensor placements, global and local shapes, anchor rows and bytes
        "sharding": trainer.asft_sharding,
        "anchor_bytes": trainer.asft_anchor_memory(),
        "safety_monitor": monitor_summary(monitor),
    }
    publish_summary(trainer, script_args, training_args, summary)
    return summary


def make_parser() -> Any:
    from trl import ModelConfig, TrlParser

    from hf_safety_merge.training import AsFTConfig

    return TrlParser((AsFTScriptArguments, AsFTConfig, ModelConfig))  # type: ignore[arg-type]


def run(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse the flags (and `--config` YAML) with TrlParser and train; returns an exit code."""
    return run_trl_script(make_parser, main, argv, prog)
