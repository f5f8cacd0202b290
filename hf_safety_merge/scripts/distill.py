"""`hf-safety-merge distill`: distil an EnchTable safety vector, TRL-style.

Every `DistillConfig` field (all of TRL's `SFTConfig`, plus `--distill_variant`,
`--distill_skip_layers`, `--distill_layers`) and every field of `DistillScriptArguments` below is
a flag; a `--config` YAML takes the same keys.

```bash
hf-safety-merge distill --aligned_model HuggingFaceTB/SmolLM2-135M-Instruct --data harmful.jsonl \\
    --distill_variant ffn --distill_skip_layers 4 --vector_dir ./safety-vector
hf-safety-merge distill --config examples/distill_config.yaml --max_steps 50 --overwrite true
```

The flags of earlier releases (`--aligned`, `--out`, `--variant`, `--epochs`, `--batch-size`,
`--grad-accum`, `--lr`, `--scheduler`, `--skip-layers`, `--layers`, `--training-arg`, ...) and
config files with their keys still work: they run the previous parser and print which flags
replace them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..validation import load_yaml
from . import SafetyMonitorArguments


@dataclass
class DistillScriptArguments(SafetyMonitorArguments):
    """Model, data and output of the distillation (the training itself: `DistillConfig`)."""

    aligned_model: str | None = field(default=None, metadata={"help": "Aligned model: local folder or Hub repo id."})
    data: str | None = field(default=None, metadata={"help": "Harmful QA: CSV/JSONL/JSON/Parquet file, datasets folder or Hub id."})
    vector_dir: str = field(default="safety-vector", metadata={"help": "Where the safety vector is written."})
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column (default: found by name)."})
    response_column: str | None = field(default=None, metadata={"help": "Response column (default: found by name)."})
    data_split: str = field(default="train", metadata={"help": "Split of a datasets source."})
    data_subset: str | None = field(default=None, metadata={"help": "Config name of a datasets source."})
    data_revision: str | None = field(default=None, metadata={"help": "Revision of a Hub data set."})
    max_samples: int | None = field(default=1000, metadata={"help": "Seeded subset size (EnchTable: ~1000; 0 = all)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt of the chat-formatted examples."})
    aligned_revision: str | None = field(default=None, metadata={"help": "Hub revision of the aligned model."})
    vector_dtype: str = field(default="float32", metadata={"help": "Stored dtype: float32, bfloat16 or float16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa (default: the model's)."})
    save_harmful_model: str | None = field(default=None, metadata={"help": "Also keep the trained (harmful) model here."})
    push_vector_to_hub: str | None = field(default=None, metadata={"help": "Push the vector folder to this Hub repo."})
    private: bool = field(default=False, metadata={"help": "Create that repo as private."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty vector_dir."})
    summary_json: bool = field(default=False, metadata={"help": "Print the summary as JSON."})


#: previous flags -> the flags that replace them
LEGACY_FLAGS = {
    "--aligned": "--aligned_model", "--out": "--vector_dir", "--variant": "--distill_variant",
    "--skip-layers": "--distill_skip_layers", "--layers": "--distill_layers", "--epochs": "--num_train_epochs",
    "--lr": "--learning_rate", "--batch-size": "--per_device_train_batch_size",
    "--grad-accum": "--gradient_accumulation_steps", "--warmup": "--warmup_steps",
    "--scheduler": "--lr_scheduler_type", "--split": "--data_split", "--subset": "--data_subset",
    "--dtype": "--vector_dtype", "--training-arg": "--KEY VALUE (any DistillConfig field)",
    "--no-progress": "--disable_tqdm true", "--json": "--summary_json true",
    "--push-to-hub": "--push_vector_to_hub",
}
_LEGACY_KEYS = {"aligned", "out", "variant", "skip_layers", "layers", "training_args", "split", "subset", "warmup"}
#: DistillConfig fields passed to distill_safety_vector as its own keywords
_MAPPED = {"distill_variant": "variant", "distill_layers": "layers", "distill_skip_layers": "skip_layers",
           "learning_rate": "learning_rate", "num_train_epochs": "num_train_epochs", "max_steps": "max_steps",
           "per_device_train_batch_size": "per_device_train_batch_size",
           "gradient_accumulation_steps": "gradient_accumulation_steps", "warmup_steps": "warmup",
           "lr_scheduler_type": "lr_scheduler_type", "max_length": "max_length", "bf16": "bf16", "seed": "seed",
           "logging_steps": "logging_steps", "distill_mlp_names": "mlp_names", "distill_attn_names": "attn_names"}
#: set by distill_safety_vector from other arguments
_DERIVED = {"disable_tqdm", "config"}


def _config_keys(argv: list[str]) -> set[str]:
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return set()
    p = Path(argv[argv.index("--config") + 1])
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else load_yaml(p.read_text())
    except Exception:  # the parser reports unreadable files itself
        return set()
    return set(data) if isinstance(data, dict) else set()


def is_legacy(argv: list[str]) -> bool:
    """Does this command line use the previous `distill` flags (or a config with their keys)?"""
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    # the previous `--push-to-hub REPO_ID` (now `--push_vector_to_hub`; TRL's --push_to_hub is a bool)
    pushes_repo = any(a in ("--push-to-hub", "--push_to_hub") and i + 1 < len(argv) and "/" in argv[i + 1]
                      for i, a in enumerate(argv))
    return bool(flags & set(LEGACY_FLAGS)) or pushes_repo or bool(_config_keys(argv) & _LEGACY_KEYS)


def make_parser() -> Any:
    from trl import TrlParser

    from ..distill.trainer import DistillConfig

    return TrlParser((DistillScriptArguments, DistillConfig))  # type: ignore[arg-type]


def _given(argv: list[str]) -> set[str]:
    """Field names set on the command line or in the --config file."""
    names = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    return names | _config_keys(argv)


def main(script_args: DistillScriptArguments, training_args: Any, given: set[str] | None = None) -> Any:
    from ..distill.api import distill_safety_vector
    from ..errors import ConfigError

    if not script_args.aligned_model or not script_args.data:
        raise ConfigError("distill needs --aligned_model and --data (or `aligned_model:` / `data:` in --config)")
    given = set(given or ())
    kwargs = {ours: getattr(training_args, f) for f, ours in _MAPPED.items()}
    if kwargs["layers"] is not None:
        kwargs["layers"] = tuple(kwargs["layers"])
    if kwargs["bf16"] is None:
        kwargs["bf16"] = False
    fields = {f.name for f in dataclasses.fields(training_args)}
    extra = {k: getattr(training_args, k) for k in sorted(given & fields) if k not in _MAPPED and k not in _DERIVED}
    progress = not bool(getattr(training_args, "disable_tqdm", False))
    with _monitored(script_args) as monitors:
        result = _distill(distill_safety_vector, script_args, progress, extra, kwargs)
    if monitors:
        from . import monitor_summary

        result.summary["safety_monitor"] = monitor_summary(monitors[0])
    if script_args.summary_json:
        print(json.dumps({"output_dir": str(result.output_dir), **result.summary}, indent=2, default=str))
    else:
        print(result)
    return result


@contextlib.contextmanager
def _monitored(script_args: Any) -> Iterator[list[Any]]:
    """With `--safety_monitor_steps`: attach a `SafetyMonitorCallback` to the `DistillTrainer` that
    `distill_safety_vector` builds (it takes no callbacks; the hook is undone on exit). The
    distillation fine-tunes the aligned model on harmful data, so its curve is expected to rise:
    `warn` is the useful policy here."""
    from . import attach_monitor, monitor_config

    monitors: list[Any] = []
    if monitor_config(script_args) is None:
        yield monitors
        return
    from ..distill.trainer import DistillTrainer

    orig = DistillTrainer.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        orig(self, *a, **k)
        monitors.append(attach_monitor(self, script_args))

    DistillTrainer.__init__ = init  # type: ignore[method-assign]
    try:
        yield monitors
    finally:
        DistillTrainer.__init__ = orig  # type: ignore[method-assign]


def _distill(distill_safety_vector: Any, script_args: Any, progress: bool, extra: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    return distill_safety_vector(
        script_args.aligned_model, script_args.data, script_args.vector_dir,
        prompt_column=script_args.prompt_column, response_column=script_args.response_column,
        split=script_args.data_split, subset=script_args.data_subset, data_revision=script_args.data_revision,
        max_samples=script_args.max_samples or None, system_prompt=script_args.system_prompt,
        aligned_revision=script_args.aligned_revision, dtype=script_args.vector_dtype,
        attn_implementation=script_args.attn_implementation, save_harmful_model=script_args.save_harmful_model,
        push_to_hub=script_args.push_vector_to_hub, private=script_args.private, overwrite=script_args.overwrite,
        progress=progress, training_args=extra or None, **kwargs,
    )


def run(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`hf-safety-merge distill ARGS`: TrlParser flags, or the previous flags (deprecated)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if is_legacy(args):
        import argparse

        from ..distill.cli import add_distill_parser

        used = sorted({a.split("=", 1)[0] for a in args if a.split("=", 1)[0] in LEGACY_FLAGS})
        hint = ", ".join(f"{a} -> {LEGACY_FLAGS[a]}" for a in used) or "config keys: aligned -> aligned_model, out -> vector_dir, ..."
        print(f"note: these distill flags are deprecated (TrlParser flags replace them: {hint}); "
              "see `hf-safety-merge distill --help`", file=sys.stderr)
        parser = argparse.ArgumentParser(prog="hf-safety-merge")
        add_distill_parser(parser.add_subparsers(dest="command", required=True))
        ns = parser.parse_args(["distill", *args])
        return int(ns.func(ns))
    parser = make_parser()
    if prog:
        parser.prog = prog
    given = _given(args)
    if "bf16" not in given and not {"-h", "--help"} & set(args):
        args = [*args, "--bf16", "false"]  # fp32 unless asked (TRL would pick bf16; docs/distillation.md)
    script_args, training_args = parser.parse_args_and_config(args=args)
    from . import finish_distributed

    main(script_args, training_args, given)
    finish_distributed()  # on success only: a failed rank must not leave the other at a barrier
    return 0
