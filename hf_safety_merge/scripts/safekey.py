# Copyright the hf-safety-merge authors. Apache-2.0.
"""SafeKey: dual-path safety head + query-mask modelling on a reasoning model, as a TRL-style script.

Every `SFTConfig` / `ModelConfig` flag of TRL's `sft.py` works, plus the `--safekey_*` flags of
`SafeKeyConfig` (see `docs/safekey.md`). The data set holds (prompt, reasoning response, label)
records: a `prompt` (string or chat messages), a `response` whose reasoning (inside `<think>...</think>`
if it has the tags) opens with a restatement of the query, and a `label` (1 / "harmful",
0 / "benign"); optional `u_end` / `k_end` character offsets into the response mark U and K
explicitly, otherwise a heuristic finds them.

```bash
# one process
hf-safety-merge safekey --config examples/safekey_config.yaml

# the same, flags only
hf-safety-merge safekey \
    --model_name_or_path deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \
    --dataset_name data/safekey.jsonl \
    --safekey_head_weight 0.2 --safekey_qmm_weight 0.2 --safekey_last_k_epochs 2 \
    --num_train_epochs 5 --learning_rate 1e-5 --output_dir out-safekey

# several processes
accelerate launch --num_processes 2 examples/train_safekey.py --config examples/safekey_config.yaml
```

The last line the main process prints is a JSON summary (final losses, the SafeKey metrics per
logging step) that scripts and tests can read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trl import ScriptArguments

from . import (
    SafetyMonitorArguments,
    attach_monitor,
    load_script_data,
    monitor_config,
    monitor_summary,
    publish_summary,
    run_trl_script,
)

logger = logging.getLogger("train_safekey")


@dataclass
class SafeKeyScriptArguments(SafetyMonitorArguments, ScriptArguments):
    """`trl.ScriptArguments` (`dataset_name` may also be a local .jsonl/.json/.csv/.parquet file)."""

    summary_file: str | None = field(default=None, metadata={"help": "Also write the JSON summary to this file."})


def load_data(args: Any) -> Any:
    """`--dataset_name` loaded with `datasets.load_dataset` (see `hf_safety_merge.scripts.load_script_data`)."""
    return load_script_data(args, "safekey")


def main(script_args: SafeKeyScriptArguments, training_args: Any, model_args: Any) -> dict[str, Any]:
    from trl import get_peft_config

    from hf_safety_merge.training import SafeKeyTrainer

    monitor_config(script_args)  # bad --safety_monitor_* flags fail here, before any model is loaded
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        # the query-masked pass gives the model a 2-D mask (0 on the query), as the reference does: any
        # attention kernel takes it (tested with sdpa, the default here, and eager)
        attn_implementation=model_args.attn_implementation or "sdpa",
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_data(script_args)
    trainer = SafeKeyTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    monitor = attach_monitor(trainer, script_args)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # heads beside it with --safekey_save_heads

    history = trainer.state.log_history

    def series(key: str) -> list[float]:
        return [h[key] for h in history if key in h]

    summary = {
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "world_size": trainer.accelerator.num_processes,
        "loss": series("loss"),
        "sft_loss": series("safekey/sft_loss"),
        "head_loss": series("safekey/head_loss"),
        "qmm_loss": series("safekey/qmm_loss"),
        "head_accuracy": series("safekey/head_accuracy"),
        "aux_active": series("safekey/aux_active"),
        "heads_saved": bool(training_args.safekey_save_heads),
        # a fingerprint of the trained heads (identical on every process)
        "heads_sq_norm": float(sum(p.detach().double().pow(2).sum() for p in trainer.safekey_heads.parameters())),
        "safety_monitor": monitor_summary(monitor),
    }
    publish_summary(trainer, script_args, training_args, summary)
    return summary


def make_parser() -> Any:
    from trl import ModelConfig, TrlParser

    from hf_safety_merge.training import SafeKeyConfig

    return TrlParser((SafeKeyScriptArguments, SafeKeyConfig, ModelConfig))  # type: ignore[arg-type]


def run(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse the flags (and `--config` YAML) with TrlParser and train; returns an exit code."""
    return run_trl_script(make_parser, main, argv, prog)
