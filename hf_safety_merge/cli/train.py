"""`hf-safety-merge distill | asft | safekey`: the TRL training scripts of `hf_safety_merge.scripts`.

Like `trl sft`, each parses its own flags with `TrlParser` (every dataclass field is a flag, a
`--config` YAML takes the same keys), so the command line after the command name goes to the
script untouched: `main` dispatches these commands before its own parser runs, and the entries
below only list them in `hf-safety-merge --help`.
"""

from __future__ import annotations

import argparse
from typing import Any

#: command -> its help line (the script: `hf_safety_merge.scripts.<command>`)
SCRIPTS = {
    "distill": "distil an EnchTable safety vector from an aligned model (TRL SFT flags + --distill_*; "
               "see docs/distillation.md)",
    "asft": "AsFT: safety-anchored LoRA fine-tuning (TRL SFT flags + --asft_*; see docs/asft.md)",
    "safekey": "SafeKey: safety-aha training of reasoning models (TRL SFT flags + --safekey_*; see docs/safekey.md)",
}


def add_parser(subparsers: Any) -> None:
    """List the script commands (their flags are the scripts' own: `hf-safety-merge NAME --help`)."""
    for name, what in SCRIPTS.items():
        p = subparsers.add_parser(name, help=f"{what}; `hf-safety-merge {name} --help` lists every flag", add_help=False)
        p.set_defaults(func=run)


def namespace(argv: list[str]) -> argparse.Namespace:
    """The parsed form of a script command line: the command and the script's own arguments."""
    return argparse.Namespace(command=argv[0], script_argv=list(argv[1:]), func=run)


def run(args: argparse.Namespace) -> int:
    """Run `hf_safety_merge.scripts.<command>` on the arguments after the command name."""
    import importlib

    script = importlib.import_module(f"hf_safety_merge.scripts.{args.command}")
    return int(script.run(args.script_argv, prog=f"hf-safety-merge {args.command}"))
