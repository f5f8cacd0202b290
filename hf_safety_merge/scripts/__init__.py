"""TRL-style training scripts, installed with the package: `hf-safety-merge asft`,
`hf-safety-merge safekey` and `hf-safety-merge distill` parse their flags with `TrlParser`
(every dataclass field is a flag, `--config` YAML keys equal the flags), like `trl sft`.
`examples/train_*.py` are thin wrappers around these modules. They need the `[train]` extra.

Layer 7 (docs/architecture.md): thin entry points over `training` and `distill`.
"""

from collections.abc import Callable
from typing import Any

#: subcommand -> module
TRL_COMMANDS = {"asft": "hf_safety_merge.scripts.asft", "safekey": "hf_safety_merge.scripts.safekey",
                "distill": "hf_safety_merge.scripts.distill"}


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
