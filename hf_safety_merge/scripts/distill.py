"""`hf-safety-merge distill`: distil an EnchTable safety vector, TRL-style.

`TrlParser((DistillScriptArguments, DistillConfig))`: every `DistillConfig` field (all of TRL's
`SFTConfig`, plus `--distill_variant`, `--distill_skip_layers`, `--distill_layers`, the data
fields such as `--prompt_column` and `--max_samples`, `--vector_dtype`, ...) is a flag, and so is
every field of `DistillScriptArguments` below (the model, the data and where the vector goes); a
`--config` YAML takes the same keys.

```bash
hf-safety-merge distill --aligned_model HuggingFaceTB/SmolLM2-135M-Instruct --data harmful.jsonl \\
    --distill_variant ffn --distill_skip_layers 4 --vector_dir ./safety-vector
hf-safety-merge distill --config examples/distill_config.yaml --max_steps 50 --overwrite true
```

The flags of earlier releases (`--aligned`, `--out`, `--variant`, `--epochs`, `--batch-size`,
`--grad-accum`, `--lr`, `--scheduler`, `--skip-layers`, `--layers`, `--training-arg KEY=VALUE`,
`--no-progress`, `--json`, `--push-to-hub REPO_ID`, ...) and config files with their keys still
work: they are aliases (declared with the fields, `aliases` metadata), and a note names the flags
that replace them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from . import SafetyMonitorArguments


@dataclass
class DistillScriptArguments(SafetyMonitorArguments):
    """Where the aligned model and the data come from and where the vector goes (every setting of
    the distillation itself: `DistillConfig`)."""

    aligned_model: str | None = field(
        default=None, metadata={"help": "Aligned model: local folder or Hub repo id.", "aliases": ["--aligned"]})
    data: str | None = field(default=None, metadata={"help": "Harmful QA: CSV/JSONL/JSON/Parquet file, datasets folder or Hub id."})
    vector_dir: str = field(
        default="safety-vector", metadata={"help": "Where the safety vector is written.", "aliases": ["--out"]})
    save_harmful_model: str | None = field(default=None, metadata={"help": "Also keep the trained (harmful) model here."})
    push_vector_to_hub: str | None = field(default=None, metadata={"help": "Push the vector folder to this Hub repo."})
    private: bool = field(default=False, metadata={"help": "Create that repo as private."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty vector_dir."})
    summary_json: bool = field(default=False, metadata={"help": "Print the summary as JSON.", "aliases": ["--json"]})


def _config_classes() -> tuple[type, type]:
    from ..distill.config import DistillConfig

    return DistillScriptArguments, DistillConfig


def _aliases() -> dict[str, str]:
    """Previous spelling (`--out`) -> flag (`--vector_dir`), from the fields' `aliases` metadata."""
    out: dict[str, str] = {}
    for cls in _config_classes():
        for f in dataclasses.fields(cls):
            for a in f.metadata.get("aliases", ()):
                out[a] = f"--{f.name}"
    return out


def _rewrite_legacy(argv: list[str]) -> tuple[list[str], list[str]]:
    """The two previous flags that are no field alias: `--training-arg KEY=VALUE` (now `--KEY VALUE`)
    and `--push-to-hub REPO_ID` (now `--push_vector_to_hub`; TRL's `--push_to_hub` is a bool).
    Returns the new command line and the notes."""
    out: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, val = a.partition("=")
        if name == "--training-arg":
            item = val if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if eq else 2
            key, sep, value = item.partition("=")
            if not sep or not key:
                from ..errors import ConfigError

                raise ConfigError(f"--training-arg expects KEY=VALUE, got {item!r}")
            out += [f"--{key.strip()}", value]
            notes.append(f"--training-arg {key.strip()}=... -> --{key.strip()} ...")
            continue
        if name in ("--push-to-hub", "--push_to_hub"):
            val = val if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if "/" in val and not val.startswith("-"):
                out += ["--push_vector_to_hub", val]
                notes.append(f"{name} REPO_ID -> --push_vector_to_hub")
                i += 1 if eq else 2
                continue
        out.append(a)
        i += 1
    return out, notes


def _config_key_translation(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Previous `--config` keys (`aligned`, `out`, `variant`, `training_args`, `push_to_hub: REPO_ID`, ...)
    -> the field names; returns the new mapping and the notes."""
    keys = {a.lstrip("-").replace("-", "_"): f.lstrip("-") for a, f in _aliases().items()}
    out: dict[str, Any] = {}
    notes: list[str] = []
    for k, v in config.items():
        if k == "training_args" and isinstance(v, dict):
            out.update(v)
            notes.append("training_args: {...} -> its keys at the top level")
        elif k == "push_to_hub" and isinstance(v, str) and "/" in v:
            out["push_vector_to_hub"] = v
            notes.append("push_to_hub: REPO_ID -> push_vector_to_hub")
        elif k in keys:
            out[keys[k]] = v
            notes.append(f"{k} -> {keys[k]}")
        else:
            out[k] = v
    return out, notes


def make_parser() -> Any:
    from trl import TrlParser

    from ..errors import ConfigError, did_you_mean

    class DistillParser(TrlParser):
        """`TrlParser` that reads the previous config keys too and names unknown keys with a suggestion."""

        notes: list[str]

        def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
            kwargs, notes = _config_key_translation(kwargs)
            self.notes = [*getattr(self, "notes", []), *notes]
            remaining = super().set_defaults_with_config(**kwargs)
            known = sorted({a.dest for a in self._actions})
            unknown = [k for k in kwargs if k not in known]
            if unknown:
                k = unknown[0]
                raise ConfigError(f"--config: unknown key {k!r}{did_you_mean(str(k), known)}")
            return remaining

    return DistillParser(_config_classes())  # type: ignore[arg-type]


def distill(script_args: DistillScriptArguments, config: Any) -> Any:
    """Run :func:`~hf_safety_merge.distill.distill_safety_vector` on the parsed arguments and print
    the result (a JSON summary with `--summary_json`); returns the `DistillResult`. The
    `--safety_monitor_*` flags attach a `SafetyMonitorCallback` (the distillation fine-tunes the
    aligned model on harmful data, so its curve is expected to rise: `warn` is the useful policy)."""
    from ..distill.api import distill_safety_vector
    from ..errors import ConfigError
    from . import monitor_config, monitor_summary

    if not script_args.aligned_model or not script_args.data:
        raise ConfigError("distill needs --aligned_model and --data (or `aligned_model:` / `data:` in --config)")
    cfg = monitor_config(script_args)  # bad --safety_monitor_* flags fail here, before any model is loaded
    monitor = None
    if cfg is not None:
        from ..monitor import SafetyMonitorCallback

        monitor = SafetyMonitorCallback(cfg)  # finds the DistillTrainer when training starts
    result = distill_safety_vector(
        config, script_args.aligned_model, script_args.data, script_args.vector_dir,
        save_harmful_model=script_args.save_harmful_model, push_to_hub=script_args.push_vector_to_hub,
        private=script_args.private, overwrite=script_args.overwrite,
        callbacks=[monitor] if monitor is not None else None,
    )
    if monitor is not None:
        result.summary["safety_monitor"] = monitor_summary(monitor)
    if script_args.summary_json:
        print(json.dumps({"output_dir": str(result.output_dir), **result.summary}, indent=2, default=str))
    else:
        print(result)
    return result


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`hf-safety-merge distill ARGS` (or `python -m hf_safety_merge.scripts.distill ARGS`): parse
    the flags and `--config` YAML with `TrlParser`, distil, print; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    args, notes = _rewrite_legacy(args)
    aliases = _aliases()
    notes += [f"{a.split('=', 1)[0]} -> {aliases[a.split('=', 1)[0]]}" for a in args if a.split("=", 1)[0] in aliases]
    parser = make_parser()
    if prog:
        parser.prog = prog
    script_args, config = parser.parse_args_and_config(args=args)
    notes += getattr(parser, "notes", [])
    if notes:
        print(f"note: these distill flags / config keys are deprecated (replace them: {', '.join(dict.fromkeys(notes))}); "
              "see `hf-safety-merge distill --help`", file=sys.stderr)
    from . import finish_distributed

    distill(script_args, config)
    finish_distributed()  # on success only: a failed rank must not leave the other at a barrier
    return 0


#: the entry point under the name the other TRL scripts use (`hf_safety_merge.scripts.asft.run`)
run = main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
