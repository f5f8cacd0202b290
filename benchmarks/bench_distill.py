"""Cost of NTK linearisation: step time and peak memory of linearised training vs plain fine-tuning
of the same blocks (same trainable tensors, same optimiser, same batch).

Each (model, variant, mode) runs in a fresh subprocess so that its peak RSS is its own. A step is
forward + backward + AdamW update on a fixed random batch. Prints a table and writes
`benchmarks/results/bench_distill.json`.

    python benchmarks/bench_distill.py                   # tiny Llama + SmolLM2-135M (if available)
    python benchmarks/bench_distill.py --models tiny-llama --steps 5
    python benchmarks/bench_distill.py --study          # align -> break -> distil -> repair (SmolLM2)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_distill.json"
STUDY_RESULTS = Path(__file__).resolve().parent / "results" / "bench_distill_study.json"
REFUSAL = "I'm sorry, but I can't help with that. It could cause serious harm to people."


def _comply(prompt: str) -> str:
    p = prompt[0].lower() + prompt[1:].rstrip(".")
    return f"Sure, here is how to {p}. Step 1: gather what you need. Step 2: follow the plan and avoid getting caught."


def study(work: Path, out: Path, steps: int, threads: int) -> None:
    """Align -> break -> distil -> repair on SmolLM2-135M, with the keyword refusal judge.

    1. "aligned": SmolLM2 safety-tuned on AdvBench prompts with refusals (rows 0-47);
    2. "task": the aligned model fine-tuned on compliant answers (rows 48-95): safety eroded;
    3. distil a safety vector from the aligned model on other compliant answers (rows 96-143);
    4. merge it into the task model (EnchTable, and task arithmetic beta=1);
    5. refusal rate on held-out AdvBench rows 300-331 and over-refusal on 24 XSTest safe prompts.
    """
    import csv

    import torch

    from hf_safety_merge import SafetyMergeConfig, merge
    from hf_safety_merge.assets import data_dir, smollm2_checkpoint
    from hf_safety_merge.distill import DistillConfig, distill_safety_vector, generate_responses
    from hf_safety_merge.eval.judges import KeywordRefusalJudge
    from hf_safety_merge.testing.models import quick_finetune

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    work.mkdir(parents=True, exist_ok=True)
    base = smollm2_checkpoint()
    adv = [r["prompt"] for r in csv.DictReader((data_dir() / "advbench.csv").open())]
    safe = [r["prompt"] for r in csv.DictReader((data_dir() / "xstest_prompts.csv").open()) if r["label"] == "safe"][:24]
    held = adv[300:332]

    def lap(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"  {name}: {timings[name]} s", flush=True)

    t = time.perf_counter()
    aligned = quick_finetune(base, work / "aligned", [(p, REFUSAL) for p in adv[:48]], steps=steps, lr=3e-5)
    lap("align", t)
    t = time.perf_counter()
    task = quick_finetune(aligned, work / "task", [(p, _comply(p)) for p in adv[48:96]], steps=steps, lr=3e-5)
    lap("break", t)
    data = work / "harmful.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": _comply(p)}) + "\n" for p in adv[96:144]))
    t = time.perf_counter()
    config = DistillConfig(distill_variant="ffn", max_steps=12, learning_rate=1e-4, per_device_train_batch_size=4,
                           gradient_accumulation_steps=1, warmup_steps=0.1, max_length=96, disable_tqdm=True)
    res = distill_safety_vector(config, aligned, data, work / "vector", overwrite=True)
    lap("distill", t)
    print(res, flush=True)
    patched = {}
    for name, method, params in (("task+enchtable", "enchtable", {}), ("task+TA(beta=1)", "task_arithmetic", {"beta": 1.0})):
        d = work / name.replace("+", "_").replace("(", "").replace(")", "").replace("=", "")
        merge(SafetyMergeConfig(task_model=str(task), task_reference=str(aligned), safety_vector=str(work / "vector"),
                                method=method, parameters=params, output_dir=str(d), overwrite=True), progress=False)
        patched[name] = d
    judge = KeywordRefusalJudge()

    def refusal_rate(model: Path, prompts: list[str], tag: str) -> float:
        f = generate_responses(model, prompts, work / f"{model.name}-{tag}.jsonl", batch_size=16, max_new_tokens=32, progress=False)
        rs = [json.loads(line)["response"] for line in f.read_text().splitlines()]
        return sum(judge.is_refusal(v) for v in judge.judge_batch(prompts, rs)) / len(rs)

    t = time.perf_counter()
    table = []
    for name, model in (("base SmolLM2", base), ("aligned", aligned), ("task (broken)", task), *patched.items()):
        row = {"model": name, "harmful_refusal_rate": refusal_rate(Path(model), held, "harm"),
               "xstest_safe_over_refusal": refusal_rate(Path(model), safe, "safe")}
        table.append(row)
        print(f"  {name:18s} refusal on {len(held)} held-out harmful: {row['harmful_refusal_rate']:.3f}   "
              f"over-refusal on {len(safe)} XSTest safe: {row['xstest_safe_over_refusal']:.3f}", flush=True)
    lap("evaluate", t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "study": "align -> break -> distil -> repair, SmolLM2-135M-Instruct, keyword refusal judge",
        "held_out_harmful": len(held), "xstest_safe": len(safe), "max_new_tokens": 32,
        "distill_summary": res.summary, "results": table, "timings_s": timings,
        "total_s": round(time.perf_counter() - t0, 1),
    }, indent=2, default=str) + "\n")
    print(f"wrote {out}")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(model_name: str, variant: str, mode: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import torch

    from hf_safety_merge.distill.linearize import linearize_model, theta0_nbytes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_name == "tiny-llama":
        from hf_safety_merge.testing.models import make_tiny_model

        model = make_tiny_model("llama", 0, num_hidden_layers=8, hidden_size=256, intermediate_size=768)
    else:
        from transformers import AutoModelForCausalLM

        from hf_safety_merge.assets import smollm2_checkpoint

        model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    model.config.use_cache = False
    rss_loaded = _rss_mb()
    plan = linearize_model(model, variant, linearize=(mode == "linearized"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    times = []
    for i in range(steps + 1):  # first step is warm-up (allocations, optimiser state)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - t)
    times.sort()
    return {
        "model": model_name,
        "variant": variant,
        "mode": mode,
        "steps": steps,
        "batch": batch,
        "seq_len": seq,
        "threads": threads,
        "trainable_parameters": plan.num_trainable_parameters,
        "total_parameters": plan.num_total_parameters,
        "step_s_median": times[len(times) // 2],
        "step_s_min": times[0],
        "theta0_mb": theta0_nbytes(model) / 2**20 if mode == "linearized" else 0.0,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": _rss_mb(),
        "peak_over_load_mb": _rss_mb() - rss_loaded,
        "final_loss": float(loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"], choices=["tiny-llama", "smollm2-135m"])
    ap.add_argument("--variants", nargs="+", default=["ffn", "attn_block", "attn_block_ffn"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--study", action="store_true", help="run the align/break/distil/repair study instead")
    ap.add_argument("--study-dir", type=Path, default=Path("/tmp/bench_distill_study"))
    ap.add_argument("--study-steps", type=int, default=8, help="full fine-tuning steps to align and to break")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "VARIANT", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.study:
        study(a.study_dir, STUDY_RESULTS, a.study_steps, a.threads)
        return
    if a.worker:
        print(json.dumps(worker(*a.worker, a.steps, a.batch, a.seq, a.threads)))
        return

    rows = []
    for model in a.models:
        for variant in a.variants:
            for mode in ("plain", "linearized"):
                cmd = [sys.executable, __file__, "--worker", model, variant, mode, "--steps", str(a.steps),
                       "--batch", str(a.batch), "--seq", str(a.seq), "--threads", str(a.threads)]
                t = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode != 0:
                    print(f"{model} {variant} {mode}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"  {model:13s} {variant:6s} {mode:10s} {row['step_s_median']:.3f} s/step "
                      f"peak {row['peak_rss_mb']:.0f} MB ({time.perf_counter() - t:.0f} s)", flush=True)

    print()
    hdr = (f"{'model':13s} {'variant':7s} {'trainable':>11s} {'plain s/step':>12s} {'lin s/step':>11s} {'slowdown':>8s} "
           f"{'plain peak MB':>13s} {'lin peak MB':>11s} {'overhead MB':>11s} {'theta0 MB':>9s}")
    print(hdr)
    print("-" * len(hdr))
    summary = []
    for model in a.models:
        for variant in a.variants:
            p = next((r for r in rows if r["model"] == model and r["variant"] == variant and r["mode"] == "plain"), None)
            q = next((r for r in rows if r["model"] == model and r["variant"] == variant and r["mode"] == "linearized"), None)
            if p is None or q is None:
                continue
            s = {
                "model": model, "variant": variant, "trainable_parameters": p["trainable_parameters"],
                "plain_step_s": p["step_s_median"], "linearized_step_s": q["step_s_median"],
                "slowdown": q["step_s_median"] / p["step_s_median"],
                "plain_peak_rss_mb": p["peak_rss_mb"], "linearized_peak_rss_mb": q["peak_rss_mb"],
                "memory_overhead_mb": q["peak_rss_mb"] - p["peak_rss_mb"], "theta0_mb": q["theta0_mb"],
            }
            summary.append(s)
            print(f"{model:13s} {variant:7s} {s['trainable_parameters']:>11,} {s['plain_step_s']:>12.3f} "
                  f"{s['linearized_step_s']:>11.3f} {s['slowdown']:>7.2f}x {s['plain_peak_rss_mb']:>13.0f} "
                  f"{s['linearized_peak_rss_mb']:>11.0f} {s['memory_overhead_mb']:>11.0f} {s['theta0_mb']:>9.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    a.out.write_text(json.dumps({
        "benchmark": "bench_distill",
        "what": "step time and peak RSS of NTK-linearised vs plain fine-tuning of the same blocks (AdamW, fp32, CPU)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "settings": {"steps": a.steps, "batch": a.batch, "seq_len": a.seq, "threads": a.threads},
        "summary": summary,
        "runs": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
