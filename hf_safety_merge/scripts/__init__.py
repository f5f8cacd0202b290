"""TRL-style training scripts, installed with the package: `hf-safety-merge asft`,
`hf-safety-merge safekey` and `hf-safety-merge distill` parse their flags with `TrlParser`
(every dataclass field is a flag, `--config` YAML keys equal the flags), like `trl sft`.
`examples/train_*.py` are thin wrappers around these modules. They need the `[train]` extra."""

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
