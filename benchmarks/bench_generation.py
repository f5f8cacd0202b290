"""Batched vs batch-size-1 generation throughput on the same prompts.

    python benchmarks/bench_generation.py                     # SmolLM2-135M-Instruct, 32 XSTest prompts
    python benchmarks/bench_generation.py --tiny --n 16       # tiny random model (smoke test)

Greedy, chat template, left padding, ``--max-new-tokens`` per prompt.  Counts generated tokens
(up to EOS, padding excluded) per wall-clock second for each batch size, prints a table and
writes JSON (default ``benchmarks/results/eval_bench_generation.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_safety_merge.eval.generation import GenerationRequest, GenerationSettings, Generator
from hf_safety_merge.eval.prompts import load_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="number of prompts (XSTest safe, first n)")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="use a tiny random model instead of SmolLM2")
    ap.add_argument("--json", default="benchmarks/results/eval_bench_generation.json")
    args = ap.parse_args(argv)

    model: Any
    if args.tiny:
        from hf_safety_merge.testing.chat import tiny_chat_model, tiny_chat_tokenizer

        model, tok, name = tiny_chat_model(0), tiny_chat_tokenizer(), "tiny-random-llama"
    else:
        from hf_safety_merge.assets import smollm2_checkpoint
        from hf_safety_merge.eval.generation import load_model

        model, tok, name = load_model(str(smollm2_checkpoint()))
    prompts = load_prompts("xstest_safe", limit=args.n)
    reqs = [GenerationRequest(it.id, it.text) for it in prompts]
    sizes = [int(x) for x in args.batch_sizes.split(",")]

    # warm-up (allocator, kernels)
    Generator(model, tok, GenerationSettings(max_new_tokens=4, batch_size=4), model_name=name).generate(reqs[:4], progress=False)

    results = []
    outputs: dict[int, list[str]] = {}
    for bs in sizes:
        gen = Generator(model, tok, GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=bs), model_name=name)
        t0 = time.perf_counter()
        rows = gen.generate(reqs, progress=False)
        dt = time.perf_counter() - t0
        ntok = sum(r["n_new_tokens"] for r in rows)
        outputs[bs] = [r["response"] for r in rows]
        results.append({"batch_size": bs, "seconds": round(dt, 2), "generated_tokens": ntok,
                        "tokens_per_s": round(ntok / dt, 1), "prompts_per_s": round(len(rows) / dt, 2)})
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["tokens_per_s"] / base, 2) if base else None
    same = {bs: sum(a == b for a, b in zip(outputs[sizes[0]], outputs[bs])) for bs in sizes}

    print(f"model {name}, {len(reqs)} prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| batch size | seconds | generated tokens | tokens/s | prompts/s | speed-up | identical outputs vs bs={sizes[0]} |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch_size']} | {r['seconds']} | {r['generated_tokens']} | {r['tokens_per_s']} | "
              f"{r['prompts_per_s']} | {r['speedup_vs_first']}x | {same[r['batch_size']]}/{len(reqs)} |")
    out = {
        "model": name, "n_prompts": len(reqs), "max_new_tokens": args.max_new_tokens, "results": results,
        "identical_outputs_vs_first": same, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
