"""`hf-safety-merge distill-data`: answer a prompt-only harmful set with an unaligned model, the
surrogate (prompt, response) data that `hf-safety-merge distill --data` reads."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
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
    q.set_defaults(func=run)
    return q


def run(args: argparse.Namespace) -> int:
    from ..distill.data import generate_responses

    out = generate_responses(args.model, args.prompts, args.out, progress=not args.no_progress,
                             **options(args, "prompt_column", "max_samples", "batch_size", "max_new_tokens",
                                       "system_prompt"))
    n = sum(1 for _ in out.open())
    print(f"wrote {n} (prompt, response) rows to {out}")
    return 0
