"""Two study rows evaluated one after the other in one process, or side by side in two processes.

    HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_eval_workers.py           # SmolLM2-135M-Instruct
    HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_eval_workers.py --n 4 --tiny  # smoke test

Each "row" generates the study's evaluation mix (`bench_eval_speed.requests`: AdvBench plain,
under DAN and with the prefill, XSTest-safe, arithmetic; ``--n`` prompts per set) with the
study's settings (batch 16, length buckets, prefix cache, greedy, 48 new tokens). Compared, on
the same machine in one run:

1. ``one process, T threads``: both rows in turn, the study's evaluation before ``eval_workers``;
2. ``one process, T/2 threads``: one row, for how well one process uses the cores;
3. ``two processes, T/2 threads each``: the two rows side by side (``eval_workers=2``).

Wall times include starting the process and loading the model (each worker of 3 loads its
own). Prints the table and writes ``benchmarks/results/eval_workers.json``, with the share of
responses identical between T and T/2 threads (a different thread count sums in another order,
which can flip a near-tie in greedy decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from bench_eval_speed import requests

    from hf_safety_merge.eval.generation import GenerationSettings, Generator, load_model

    model: Any
    if args.tiny:
        from hf_safety_merge.testing.chat import tiny_chat_model, tiny_chat_tokenizer

        model, tok, name = tiny_chat_model(0), tiny_chat_tokenizer(), "tiny-random-llama"
    else:
        from hf_safety_merge.assets import smollm2_checkpoint

        model, tok, name = load_model(str(smollm2_checkpoint()))
    reqs = requests(args.n, name, os.environ.get("HF_SAFETY_DATA_DIR"))
    t = time.perf_counter()
    responses: list[str] = []
    for _ in range(args.rows):
        gen = Generator(model, tok, GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=16), model_name=name)
        responses += [r["response"] for r in gen.generate(reqs, progress=False)]
    print(json.dumps({"generate_seconds": time.perf_counter() - t, "responses": responses, "model": name,
                      "prompts": len(reqs)}))


def run(n_proc: int, threads: int, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--rows", str(rows), "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens)] + (["--tiny"] if args.tiny else [])
    t = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n_proc)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: {cmd}")
    return {"wall_seconds": round(time.perf_counter() - t, 2), "outs": outs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="prompts per set (5 sets) in one row")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="T (default: the cores torch sees)")
    ap.add_argument("--rows", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    ap.add_argument("--json", default=str(HERE / "results" / "eval_workers.json"))
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    t_all = args.threads or torch.get_num_threads()
    half = max(1, t_all // 2)
    seq = run(1, t_all, 2, args)
    one = run(1, half, 1, args)
    par = run(2, half, 1, args)
    n_rows = 2 * seq["outs"][0]["prompts"]
    a = seq["outs"][0]["responses"]
    b = par["outs"][0]["responses"] + par["outs"][1]["responses"]
    results = [
        {"config": f"one process, {t_all} threads, 2 rows in turn", "wall_seconds": seq["wall_seconds"], "rows": 2},
        {"config": f"one process, {half} thread(s), 1 row", "wall_seconds": one["wall_seconds"], "rows": 1},
        {"config": f"two processes, {half} thread(s) each, 2 rows side by side", "wall_seconds": par["wall_seconds"], "rows": 2},
    ]
    for r in results:
        r["rows_per_minute"] = round(60 * r["rows"] / r["wall_seconds"], 2)
    speedup = round(seq["wall_seconds"] / par["wall_seconds"], 2)
    print(f"model {seq['outs'][0]['model']}; one row = {seq['outs'][0]['prompts']} prompts ({args.n} per set); greedy, "
          f"{args.max_new_tokens} new tokens; torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| configuration | wall s (with start-up) | rows per minute |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['wall_seconds']} | {r['rows_per_minute']} |")
    ident = sum(x == y for x, y in zip(a, b))
    print(f"side by side: {speedup}x less wall time for the two rows; {ident}/{n_rows} responses identical to the "
          f"{t_all}-thread ones")
    out = {"model": seq["outs"][0]["model"], "n_per_set": args.n, "prompts_per_row": seq["outs"][0]["prompts"],
           "max_new_tokens": args.max_new_tokens, "threads": t_all, "results": results, "speedup_side_by_side": speedup,
           "identical_responses": ident, "responses": n_rows, "torch": torch.__version__, "cpus": os.cpu_count(),
           "load_average_at_end": os.getloadavg()[0], "python": platform.python_version()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
