"""`hf-safety-merge distill` and `hf-safety-merge distill-data` subcommands.

Wire them into a CLI with :func:`add_distill_parser` (it registers both on an argparse
subparsers object; each sets `func` to a callable taking the Namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, did_you_mean
from ..validation import load_yaml
from .linearize import DEPRECATED_VARIANTS, VARIANTS

DISTILL_EPILOG = """examples:
  hf-safety-merge distill --aligned HuggingFaceTB/SmolLM2-135M-Instruct --data harmful.jsonl \\
      --variant ffn --skip-layers 4 --out ./safety-vector
  hf-safety-merge distill --config distill.yaml --max-steps 50 --out ./vec --overwrite

The data: a CSV/JSONL/JSON/Parquet file or a `datasets` source (Hub id, folder) with a prompt and a
response column (found by name, or given with --prompt-column/--response-column). Build one from a
prompt-only set with `hf-safety-merge distill-data`.

A --config YAML holds the same keys as the long flags (underscores), e.g.
  aligned: ./aligned
  data: ./harmful.jsonl
  variant: attn_ffn
  skip_layers: 2
  learning_rate: 1.0e-5
  num_train_epochs: 4
Flags given on the command line override the file.
"""

# Flags that map 1:1 onto distill_safety_vector keyword arguments.
_API_KEYS = (
    "variant", "layers", "skip_layers", "prompt_column", "response_column", "split", "subset",
    "data_revision", "max_samples", "system_prompt", "learning_rate", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "warmup", "lr_scheduler_type",
    "max_length", "bf16", "seed", "logging_steps", "aligned_revision", "dtype", "attn_implementation",
    "save_harmful_model", "push_to_hub", "private", "overwrite",
)
_CONFIG_KEYS = ("aligned", "data", "out", "training_args", *_API_KEYS)


def add_distill_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `distill` (and `distill-data`) on an argparse subparsers object; returns `distill`."""
    p = subparsers.add_parser(
        "distill",
        help="distil an EnchTable safety vector (NTK-linearised harmful fine-tuning)",
        description="Fine-tune NTK-linearised blocks of an aligned model on harmful QA and save "
        "Delta_s = theta_aligned - theta_harmful as a safety vector (the harmful model is not kept).",
        epilog=DISTILL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    S = argparse.SUPPRESS  # unset flags stay absent, so that --config values are not overridden
    p.add_argument("--config", help="YAML/JSON file with any of the options below")
    p.add_argument("--aligned", default=S, help="aligned model: local folder or Hub repo id")
    p.add_argument("--data", default=S, help="harmful QA: CSV/JSONL/JSON/Parquet file, datasets folder or Hub id")
    p.add_argument("--out", default=S, help="output folder of the safety vector")
    p.add_argument("--variant", default=S, choices=(*VARIANTS, *DEPRECATED_VARIANTS),
                   help="blocks to train: ffn | attn | attn_ffn (EnchTable reference modes; attn = plain fine-tuning "
                   "of the attention projections) | attn_block | attn_block_ffn (whole attention block linearised; "
                   "extensions) (default ffn)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--skip-layers", dest="skip_layers", type=int, default=S, metavar="N", help="train layers [N, L-N)")
    g.add_argument("--layers", type=int, nargs=2, default=S, metavar=("START", "END"), help="train layers [START, END)")
    d = p.add_argument_group("data")
    d.add_argument("--prompt-column", dest="prompt_column", default=S)
    d.add_argument("--response-column", dest="response_column", default=S)
    d.add_argument("--split", default=S, help="split of a datasets source (default train)")
    d.add_argument("--subset", default=S, help="config name of a datasets source")
    d.add_argument("--data-revision", dest="data_revision", default=S)
    d.add_argument("--max-samples", dest="max_samples", type=int, default=S, help="seeded subset size (default 1000; 0 = all)")
    d.add_argument("--system-prompt", dest="system_prompt", default=S)
    t = p.add_argument_group("training (EnchTable reference values except --max-length and precision)")
    t.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=S, help="default 1e-5")
    t.add_argument("--epochs", dest="num_train_epochs", type=float, default=S, help="default 4")
    t.add_argument("--max-steps", dest="max_steps", type=int, default=S, help="optimiser steps; overrides --epochs")
    t.add_argument("--batch-size", dest="per_device_train_batch_size", type=int, default=S, help="per device (default 4)")
    t.add_argument("--grad-accum", dest="gradient_accumulation_steps", type=int, default=S, help="default 4 (4 x 4 = 16)")
    t.add_argument("--warmup", type=float, default=S, help="warmup fraction (<1) or steps (default 0.1)")
    t.add_argument("--scheduler", dest="lr_scheduler_type", default=S, help="default cosine")
    t.add_argument("--max-length", dest="max_length", type=int, default=S, help="tokens per example (default 512; reference 2048)")
    t.add_argument("--bf16", action="store_true", default=S, help="bf16 mixed precision (the reference's; default fp32)")
    t.add_argument("--seed", type=int, default=S)
    t.add_argument("--logging-steps", dest="logging_steps", type=float, default=S)
    t.add_argument("--attn-implementation", dest="attn_implementation", default=S, help="eager | sdpa (default: the model's)")
    t.add_argument("--training-arg", dest="training_arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other DistillConfig/SFTConfig field (YAML value), repeatable")
    o = p.add_argument_group("output")
    o.add_argument("--aligned-revision", dest="aligned_revision", default=S)
    o.add_argument("--dtype", default=S, choices=("float32", "bfloat16", "float16"), help="stored dtype (default float32)")
    o.add_argument("--save-harmful-model", dest="save_harmful_model", default=S, metavar="DIR",
                   help="also keep the trained (harmful) model there")
    o.add_argument("--push-to-hub", dest="push_to_hub", default=S, metavar="REPO_ID")
    o.add_argument("--private", action="store_true", default=S)
    o.add_argument("--overwrite", action="store_true", default=S)
    o.add_argument("--no-progress", dest="no_progress", action="store_true")
    o.add_argument("--json", dest="json_summary", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_distill)

    q = subparsers.add_parser(
        "distill-data",
        help="answer prompt-only harmful sets with an unaligned model (surrogate data for distill)",
        description="Batched greedy generation (left padding) with an unaligned model; writes JSONL "
        "rows {prompt, response} that `hf-safety-merge distill --data` reads.",
    )
    q.add_argument("--model", required=True, help="the (unaligned) model that answers")
    q.add_argument("--prompts", required=True, help="CSV/JSONL/... file or datasets source with a prompt column")
    q.add_argument("--out", required=True, help="JSONL file to write")
    q.add_argument("--prompt-column", dest="prompt_column")
    q.add_argument("--max-samples", dest="max_samples", type=int)
    q.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    q.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=128)
    q.add_argument("--system-prompt", dest="system_prompt")
    q.add_argument("--no-progress", dest="no_progress", action="store_true")
    q.set_defaults(func=run_distill_data)
    return p


def _load_config(path: str) -> dict[str, Any]:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"{f}: config file not found")
    try:
        data = json.loads(f.read_text()) if f.suffix == ".json" else load_yaml(f.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{f}: cannot parse ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{f}: expected a mapping of options, got {type(data).__name__}")
    for k in data:
        if k not in _CONFIG_KEYS:
            raise ConfigError(f"{f}: unknown key {k!r}{did_you_mean(str(k), _CONFIG_KEYS)}; known keys: {sorted(_CONFIG_KEYS)}")
    return data


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = _load_config(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k in _CONFIG_KEYS}
    opts.update(given)
    extra = dict(opts.get("training_args") or {})
    for item in getattr(args, "training_arg", []) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--training-arg expects KEY=VALUE, got {item!r}")
        extra[key.strip()] = load_yaml(value)
    opts["training_args"] = extra
    for req in ("aligned", "data", "out"):
        if not opts.get(req):
            raise ConfigError(f"missing --{req} (or `{req}:` in --config)")
    if opts.get("max_samples") == 0:
        opts["max_samples"] = None
    return opts


def run_distill(args: argparse.Namespace) -> int:
    """Entry point of `hf-safety-merge distill`."""
    from .api import distill_safety_vector

    opts = _resolve(args)
    aligned, data, out = opts.pop("aligned"), opts.pop("data"), opts.pop("out")
    training_args = opts.pop("training_args")
    if "layers" in opts and opts["layers"] is not None:
        opts["layers"] = tuple(opts["layers"])
    progress = not getattr(args, "no_progress", False)
    if progress:
        print(f"distilling a safety vector from {aligned} on {data} (variant {opts.get('variant', 'ffn')}) -> {out}")
    result = distill_safety_vector(
        aligned, data, out, progress=progress, training_args=training_args or None,
        **{k: v for k, v in opts.items() if k in _API_KEYS},
    )
    if getattr(args, "json_summary", False):
        print(json.dumps({"output_dir": str(result.output_dir), **result.summary}, indent=2, default=str))
    else:
        print(result)
    return 0


def run_distill_data(args: argparse.Namespace) -> int:
    """Entry point of `hf-safety-merge distill-data`."""
    from .data import generate_responses

    out = generate_responses(
        args.model,
        args.prompts,
        args.out,
        prompt_column=args.prompt_column,
        max_samples=args.max_samples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt,
        progress=not args.no_progress,
    )
    n = sum(1 for _ in out.open())
    print(f"wrote {n} (prompt, response) rows to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m hf_safety_merge.distill.cli distill ...`)."""
    from ..errors import SafetyMergeError

    parser = argparse.ArgumentParser(prog="hf-safety-merge")
    sub = parser.add_subparsers(dest="command", required=True)
    add_distill_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SafetyMergeError as e:
        print(f"error: {e}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
