"""`hf-safety-merge` command line: one module per command, like `trl`'s CLI.

Every command module has `add_parser(subparsers)` (its sub-parser, with `func` set) and
`run(args) -> int` (the exit code); heavy imports happen inside `run`, so the CLI starts fast.
`_common` holds what several commands share (the backend options, `options()`: parsed options
as keyword arguments). The TRL training commands (`distill`, `asft`, `safekey`) parse their own
flags with TrlParser: `train` hands their command line to `hf_safety_merge.scripts.<name>`.

Layer 6 (docs/architecture.md): may import anything; nothing in the library imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import SafetyMergeError
from ._common import MERGE_CONFIG_EXAMPLE

__all__ = ["COMMANDS", "EPILOG", "build_parser", "main", "run_command"]

EPILOG = """examples:
  hf-safety-merge distill --aligned_model ./aligned --data harmful_qa.jsonl --distill_variant ffn --vector_dir ./vector
  hf-safety-merge asft --config examples/asft_config.yaml     # TrlParser flags, like `trl sft`
  hf-safety-merge vector compute --aligned ./aligned --reference ./harmful --out ./vector
  hf-safety-merge merge merge.yaml ./patched
  hf-safety-merge repair repair.yaml --out ./repaired      # the repair to ship, searched across methods
  hf-safety-merge eval --model ./patched --model ./my-finetune --judge keyword --attacks dan,base64
  hf-safety-merge push me/my-finetune-safe ./patched --create-pr
  hf-safety-merge methods
  hf-safety-merge demo --out ./demo_output
  hf-safety-merge study --preset demo --work ./study_output

""" + MERGE_CONFIG_EXAMPLE

#: command -> the module of this package that defines it (`--help` lists them in this order)
COMMANDS = {
    "merge": "merge", "repair": "repair", "push": "push", "vector": "vector", "methods": "methods",
    "distill": "train", "asft": "train", "safekey": "train", "distill-data": "distill_data",
    "eval": "eval", "judge": "judge", "study": "study", "demo": "demo",
}


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. With `command` (the command a command line names), only that
    command's sub-parser is built and every other command is a bare placeholder: its parse and
    its help are the same, without the imports of the other parsers (the evaluation package's
    backend options: ~0.08 s)."""
    p = argparse.ArgumentParser(
        prog="hf-safety-merge",
        description="Restore and preserve the safety alignment of fine-tuned LLMs (EnchTable, RESTA, Safe LoRA, TIES, DARE).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"hf-safety-merge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        names = [n for n, m in COMMANDS.items() if m == module]
        if command is None or command in names:
            _module(module).add_parser(sub)
        else:
            for n in names:
                sub.add_parser(n, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Library errors print one line (`error: ...`, exit 2); Ctrl-C and SIGTERM
    clean up (no temporary folder is left) and print one line (exit 130 / 143).

    Called without `argv` (the console script, `python -m hf_safety_merge.cli`), the command
    runs in a process of its own, which exits right after: the objects made by the imports are
    moved out of the garbage collector's reach (`gc.freeze()`) before the command, and every
    object left after it, so that neither a collection during the command nor interpreter
    shutdown walks the hundreds of thousands of objects torch creates at import (shutdown alone:
    ~0.3 s of every command on 2 cores, measured with farm-bench: `python -c "import torch"`
    1.54 s, with `gc.freeze()` at the end 0.71x that)."""
    if argv is None:
        import gc

        gc.freeze()  # the imports' objects: no collection during the command walks them again
        try:
            return _main(sys.argv[1:])
        finally:
            gc.freeze()
    return _main(list(argv))


def _main(argv: list[str]) -> int:
    from .train import SCRIPTS, namespace

    if argv and argv[0] in SCRIPTS:  # TrlParser-based, like `trl sft`: the script parses the rest
        args = namespace(argv)
    else:
        named = argv[0] if argv and not argv[0].startswith("-") else None
        args = build_parser(named).parse_args(argv)
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """`args.func(args)` with the CLI's error handling: a library error or a full disk prints one
    line and returns 2; an interrupt (Ctrl-C, SIGTERM) prints one line and returns 130 / 143."""
    from ..io.output import Interrupted, terminate_as_interrupt

    try:
        with terminate_as_interrupt():
            return int(args.func(args))
    except SafetyMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from ..io.output import is_disk_full

        if not is_disk_full(e):
            raise
        # a write outside an output folder's own handling (which raises DiskSpaceError)
        print(f"error: the disk filled ({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}); "
              "free some space and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signame = e.signame if isinstance(e, Interrupted) else "SIGINT"
        print(f"interrupted ({signame}): stopped; temporary folders were removed and nothing half-written was kept",
              file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
