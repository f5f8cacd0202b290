"""TRL-style training scripts, installed with the package: `hf-safety-merge asft`,
`hf-safety-merge safekey` and `hf-safety-merge distill` parse their flags with `TrlParser`
(every dataclass field is a flag, `--config` YAML keys equal the flags), like `trl sft`.
`examples/train_*.py` are thin wrappers around these modules. They need the `[train]` extra.
The CLI (`hf_safety_merge/cli/train.py`) hands each command line to its script's
`run(argv, prog)`, as `trl`'s CLI does with the scripts it keeps beside it.

Layer 6 (docs/architecture.md): thin entry points over `training` and `distill`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def finish_distributed() -> None:
    """Tear down a torch.distributed process group (accelerate/torchrun launches) before the
    interpreter exits: a gloo group left alive can abort a rank at exit ("terminate called without
    an active exception"), which fails a run whose training had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def load_script_data(args: Any, command: str) -> Any:
    """`datasets.load_dataset` of `--dataset_name`: a Hub id or a local folder, or one local
    .jsonl/.json/.csv/.parquet file (as split `--dataset_train_split`); `--dataset_streaming` where
    the script has it."""
    from pathlib import Path

    from datasets import load_dataset

    if not args.dataset_name:
        raise SystemExit(f"hf-safety-merge {command}: --dataset_name is required (a Hub id, or a local folder or .jsonl/.csv/.json file)")
    p = Path(args.dataset_name)
    if p.is_file():
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(p.suffix)
        if kind is None:
            raise SystemExit(f"hf-safety-merge {command}: cannot read {p}: expected a .jsonl, .json, .csv or .parquet file")
        return load_dataset(kind, data_files={args.dataset_train_split: str(p)})
    streaming = getattr(args, "dataset_streaming", None)
    return load_dataset(args.dataset_name, name=args.dataset_config, **({} if streaming is None else {"streaming": streaming}))


def publish_summary(trainer: Any, script_args: Any, training_args: Any, summary: dict[str, Any]) -> None:
    """On the main process: write the summary file, push if asked, print the summary as JSON."""
    import json

    if trainer.accelerator.is_main_process:
        if script_args.summary_file:
            with open(script_args.summary_file, "w") as f:
                json.dump(summary, f, indent=1)
        if training_args.push_to_hub:
            trainer.push_to_hub(dataset_name=script_args.dataset_name)
        print(json.dumps(summary))


def run_trl_script(make_parser: Callable[[], Any], main: Callable[..., Any], argv: list[str] | None,
                   prog: str | None) -> int:
    """Parse (script, training, model) arguments with TrlParser (`--config` YAML too), train, and
    tear the process group down on success; returns an exit code."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = make_parser()
    if prog:
        parser.prog = prog
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    main(script_args, training_args, model_args)
    finish_distributed()  # on success only: a failed rank must not leave the other at a barrier
    return 0


@dataclass
class SafetyMonitorArguments:
    """The `--safety_monitor_*` flags of every training script (docs/monitor.md): probe the model's
    safety while it trains (`hf_safety_merge.monitor.SafetyMonitorCallback`). Off unless
    `--safety_monitor_steps` is given (0 = probe only at the start and the end)."""

    safety_monitor_steps: int | None = field(default=None, metadata={"help": "Probe safety every N steps (and at start and end); 0 = start and end only. Off when unset."})
    safety_monitor_policy: str = field(default="warn", metadata={"help": "warn | stop | keep_safest | patch."})
    safety_monitor_threshold: float = field(default=10.0, metadata={"help": "Erosion: the unsafe rate rose more than this many points over the start..."})
    safety_monitor_alpha: float = field(default=0.05, metadata={"help": "...with a paired exact McNemar p-value below this."})
    safety_monitor_judge: str = field(default="auto", metadata={"help": "The judge (auto, learned, keyword, llama_guard3, ...; name:path for weights)."})
    safety_monitor_harmful: str = field(default="advbench", metadata={"help": "Harmful probes: a built-in set or a .csv/.jsonl file."})
    safety_monitor_harmful_size: int = field(default=16, metadata={"help": "Number of harmful probes."})
    safety_monitor_benign: str | None = field(default="xstest_safe", metadata={"help": "Benign borderline probes (over-refusal); 'none' skips them."})
    safety_monitor_benign_size: int = field(default=8, metadata={"help": "Number of benign probes."})
    safety_monitor_task: str | None = field(default=None, metadata={"help": "Task probes: a .csv/.jsonl file with prompt and answer columns."})
    safety_monitor_task_metric: str = field(default="exact_match", metadata={"help": "exact_match | number."})
    safety_monitor_task_floor: float | None = field(default=None, metadata={"help": "keep_safest: minimum task score (a fraction)."})
    safety_monitor_max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per probe."})
    safety_monitor_safety_vector: str | None = field(default=None, metadata={"help": "patch: the safety-vector folder or Hub id."})
    safety_monitor_patch_method: str = field(default="enchtable", metadata={"help": "patch: enchtable | task_arithmetic (RESTA)."})
    safety_monitor_patch_beta: float | None = field(default=None, metadata={"help": "patch: the method's beta (default: the method's)."})
    safety_monitor_patch_reference: str | None = field(default=None, metadata={"help": "patch: the model before fine-tuning (default: the trained model's source)."})
    safety_monitor_patch_output_dir: str | None = field(default=None, metadata={"help": "patch: where the repaired model goes (default <output_dir>-patched)."})


def monitor_config(args: Any) -> Any:
    """The `SafetyMonitorConfig` of a script's `--safety_monitor_*` flags, or None when off."""
    steps = getattr(args, "safety_monitor_steps", None)
    if steps is None:
        return None
    from hf_safety_merge.monitor import SafetyMonitorConfig

    benign = args.safety_monitor_benign
    if isinstance(benign, str) and benign.strip().casefold() in ("", "none"):
        benign = None
    return SafetyMonitorConfig(
        steps=steps, policy=args.safety_monitor_policy, threshold_points=args.safety_monitor_threshold,
        alpha=args.safety_monitor_alpha, judge=args.safety_monitor_judge, harmful=args.safety_monitor_harmful,
        harmful_size=args.safety_monitor_harmful_size, benign=benign, benign_size=args.safety_monitor_benign_size,
        task=args.safety_monitor_task, task_metric=args.safety_monitor_task_metric,
        task_floor=args.safety_monitor_task_floor, max_new_tokens=args.safety_monitor_max_new_tokens,
        safety_vector=args.safety_monitor_safety_vector, patch_method=args.safety_monitor_patch_method,
        patch_parameters={} if args.safety_monitor_patch_beta is None else {"beta": args.safety_monitor_patch_beta},
        patch_reference=args.safety_monitor_patch_reference, patch_output_dir=args.safety_monitor_patch_output_dir,
    )


def attach_monitor(trainer: Any, args: Any) -> Any:
    """Attach a `SafetyMonitorCallback` built from the `--safety_monitor_*` flags (None when off)."""
    cfg = monitor_config(args)
    if cfg is None:
        return None
    from hf_safety_merge.monitor import SafetyMonitorCallback

    return SafetyMonitorCallback(cfg, trainer=trainer)


def monitor_summary(monitor: Any) -> dict[str, Any] | None:
    """What a script's JSON summary says about the monitor (None when off)."""
    if monitor is None:
        return None
    return {"points": [{k: v for k, v in p.items() if k not in ("unsafe_flags", "labels", "responses")} for p in monitor.curve],
            "monitor_seconds": round(monitor.monitor_seconds, 3), "train_seconds": round(monitor.train_seconds, 3),
            "safest_dir": str(monitor.safest_dir) if monitor.safest_dir else None,
            "patched_dir": str(monitor.patched_dir) if monitor.patched_dir else None, "patch_error": monitor.patch_error}
