"""Real safety evaluation of SmolLM2-135M-Instruct on the CPU (reproducible with one command).

    python benchmarks/eval_smollm2.py                       # full run (~200 harmful, 250 XSTest safe, 3 attacks)
    python benchmarks/eval_smollm2.py --harmful-limit 8 --benign-limit 8 --out /tmp/quick   # smoke test

Harmful prompts: the held-out (eval) half of AdvBench, split by seed 0 (the other half is what a
safety-tuning study may train on), first ``--harmful-limit`` rows.  Benign: the 250 safe XSTest
prompts (over-refusal).  Attacks: a DAN preamble, base64, prefilling.  Judge: the keyword refusal
judge (its agreement with human labels is in docs/evaluation.md).  Generations are streamed to
``<out>/<model>/generations.jsonl``; rerunning resumes (and, when nothing is left to generate,
only re-judges: the timing of the generating run in ``timing.json`` is kept).  Prints the Markdown table and the wall
time, and writes ``report.json``, ``report.md``, the PNG plots and ``timing.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from hf_safety_merge.assets import smollm2_checkpoint
from hf_safety_merge.eval import compare_models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/eval_smollm2")
    ap.add_argument("--harmful-limit", type=int, default=200)
    ap.add_argument("--benign-limit", type=int, default=None)
    ap.add_argument("--attacks", default="dan:Dan_7_0,base64,prefill")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--judge", default="keyword")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ckpt = smollm2_checkpoint()
    rep = compare_models(
        [str(ckpt)],
        model_names=["SmolLM2-135M-Instruct"],
        output_dir=args.out,
        harmful="advbench",
        harmful_eval_size=0.5,
        split_seed=0,
        harmful_limit=args.harmful_limit,
        benign="xstest_safe",
        benign_limit=args.benign_limit,
        attacks=[a for a in args.attacks.split(",") if a],
        judge=args.judge,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    wall = time.perf_counter() - t0
    table = rep.to_markdown()
    print(table)
    m = rep.models[0]
    print(m.summary())
    print(f"wall time: {wall:.1f} s (generation {m.timings.get('generate', 0):.1f} s for "
          f"{int(m.timings.get('generate_new_rows', 0))} new rows, {int(m.timings.get('generated_tokens', 0))} tokens)")
    info = {
        "wall_seconds": round(wall, 1),
        "timings": m.timings,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "args": vars(args),
    }
    # A rerun that only resumes (nothing new generated) re-judges; keep the generating run's timing.
    fname = "timing.json" if m.timings.get("generate_new_rows", 0) > 0 else "timing_rejudge.json"
    Path(args.out, fname).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
