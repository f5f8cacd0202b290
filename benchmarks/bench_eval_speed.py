"""The study's evaluation mix, generated six ways: what each exact speed-up buys.

    HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_eval_speed.py            # SmolLM2-135M-Instruct
    HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_eval_speed.py --n 8 --tiny   # smoke test

The mix is what one headline row of the study generates, ``--n`` prompts per set: AdvBench
plain, AdvBench under the DAN preambles (one per prompt, 14 in all), AdvBench with the
compliance prefill, XSTest-safe, arithmetic. Configurations, each on the same prompts:

1. ``naive``: batch 16 in request order, no prefix cache;
2. ``+ bucketing``: batches of similar prompt length (``sort_by_length``);
3. ``+ prefix cache``: each DAN preamble's key/value cache computed once (``prefix_cache_min_tokens=64``);
4. and 5. the same at batch 32, without and with the prefix cache;
6. a token budget: at most 64 rows and 8192 tokens a batch (``max_batch_tokens``), with the cache.

Rows stop at EOS in every configuration (a batch ends when all its rows have). Greedy, 48 new
tokens. Prints the table and writes ``benchmarks/results/eval_speed.json``, with the share of
responses identical to the naive configuration's (the speed-ups are exact up to floating-point
rounding, which can flip a near-tie in greedy decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_safety_merge.eval.attacks import get_attack
from hf_safety_merge.eval.generation import GenerationRequest, GenerationSettings, Generator
from hf_safety_merge.study import StudyConfig, load_study_data

CONFIGS = (
    ("naive", dict(batch_size=16, sort_by_length=False, prefix_cache_min_tokens=0)),
    ("+ bucketing", dict(batch_size=16, sort_by_length=True, prefix_cache_min_tokens=0)),
    ("+ prefix cache", dict(batch_size=16, sort_by_length=True, prefix_cache_min_tokens=64)),
    ("batch 32 + bucketing", dict(batch_size=32, sort_by_length=True, prefix_cache_min_tokens=0)),
    ("batch 32 + prefix cache", dict(batch_size=32, sort_by_length=True, prefix_cache_min_tokens=64)),
    ("<= 64 rows, <= 8192 tokens + prefix cache", dict(batch_size=64, max_batch_tokens=8192, sort_by_length=True,
                                                      prefix_cache_min_tokens=64)),
)


def requests(n: int, name: str, data_dir: str | None) -> list[GenerationRequest]:
    d = load_study_data(StudyConfig.preset("full", data_dir=data_dir))
    dan, prefill = get_attack("dan", data_dir), get_attack("prefill", data_dir)
    reqs = [GenerationRequest(f"harmful/{i}", p) for i, p in enumerate(d.eval_harmful[:n])]
    for a in (dan, prefill):
        for i, p in enumerate(d.eval_harmful[:n]):
            ap = a(p, name)
            reqs.append(GenerationRequest(f"{a.name}/{i}", ap.user, ap.prefill))
    reqs += [GenerationRequest(f"benign/{i}", p) for i, p in enumerate(d.eval_benign[:n])]
    reqs += [GenerationRequest(f"task/{i}", r["prompt"]) for i, r in enumerate(d.task_eval[:n])]
    return reqs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32, help="prompts per set (5 sets)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "eval_speed.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model: Any
    if args.tiny:
        from hf_safety_merge.testing.chat import tiny_chat_model, tiny_chat_tokenizer

        model, tok, name = tiny_chat_model(0), tiny_chat_tokenizer(), "tiny-random-llama"
    else:
        from hf_safety_merge.assets import smollm2_checkpoint
        from hf_safety_merge.eval.generation import load_model

        model, tok, name = load_model(str(smollm2_checkpoint()))
    data_dir = os.environ.get("HF_SAFETY_DATA_DIR")
    reqs = requests(args.n, name, data_dir)
    Generator(model, tok, GenerationSettings(max_new_tokens=2, batch_size=4), model_name=name).generate(reqs[:4], progress=False)
    results, outputs = [], {}
    for label, kw in CONFIGS:
        gen = Generator(model, tok, GenerationSettings(max_new_tokens=args.max_new_tokens, **kw), model_name=name)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        rows = gen.generate(reqs, progress=False)
        dt = time.perf_counter() - t0
        outputs[label] = [r["response"] for r in rows]
        results.append({"config": label, **kw, "seconds": round(dt, 2), "rows_per_s": round(len(rows) / dt, 3),
                        "generated_tokens": sum(r["n_new_tokens"] for r in rows),
                        "prefix_tokens_reused": getattr(gen.backend, "stats", {}).get("prefix_tokens_reused", 0)})
    first = results[0]["seconds"]
    for r in results:
        r["speedup_vs_naive"] = round(first / r["seconds"], 2)
        r["identical_to_naive"] = sum(a == b for a, b in zip(outputs["naive"], outputs[r["config"]]))
    print(f"model {name}; {len(reqs)} prompts ({args.n} per set: plain, DAN, prefill, XSTest-safe, task); greedy, "
          f"{args.max_new_tokens} new tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| configuration | seconds | rows/s | speed-up vs naive | identical to naive | prefix tokens reused |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['seconds']} | {r['rows_per_s']} | {r['speedup_vs_naive']}x | "
              f"{r['identical_to_naive']}/{len(reqs)} | {r['prefix_tokens_reused']} |")
    out = {"model": name, "n_per_set": args.n, "n_prompts": len(reqs), "max_new_tokens": args.max_new_tokens, "results": results,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_average_at_end": os.getloadavg()[0], "python": platform.python_version()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
