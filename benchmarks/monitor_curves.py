"""The safety monitor on the study's two downstream fine-tunes: when in training is safety lost?

Runs, with the study's own settings (hf_safety_merge/study: `StudyConfig()` = the `full` preset's
defaults, `load_study_data`, `Stages.train_args` / `break_pairs` / `lora_args`), starting from the
study's aligned model (`--aligned`, default `demo_output/aligned`, the model `hf-safety-merge demo`
aligns; the study's own `<work>/aligned` works the same):

- `ft-full`: the benign full fine-tune (`Stages.break_full`: 900 arithmetic rows, no harmful row,
  lr 5e-5, cosine, warmup 0.1, batch 8, one epoch = 113 steps);
- `ft-lora`: the LoRA fine-tune (`Stages.lora_run` at lambda 0 = AsFT's plain-LoRA baseline: the
  same task rows plus 10% complied harmful rows, q/v r 8, alpha 32, lr 5e-5 constant).

Each run is monitored by `hf_safety_merge.monitor.monitor_fine_tune` on the study's held-out
probes: the first `--harmful-size` (32) `eval_harmful` AdvBench prompts, `--benign-size` (8)
`eval_benign` XSTest-safe prompts and `--task-size` (8) `task_eval` arithmetic problems
(last-number match), greedy, 32 new tokens, the `auto` judge, every `--every` steps.
`--task-train 360` is the `demo` preset's size (45 steps instead of 113). Writes `benchmarks/results/monitor/<run>.json` (the monitor's curve),
`summary.json` and `curves.png`, and prints each run's table.

    python benchmarks/monitor_curves.py                       # both runs (about 2 x 12 min on 2 quiet cores)
    python benchmarks/monitor_curves.py --runs ft-full --every 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "monitor"
sys.path.insert(0, str(ROOT))


def run_one(name: str, stages: Any, aligned: Path, base: Path, every: int, out_dir: Path, threads: int,
            sizes: tuple[int, int, int]) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from hf_safety_merge.monitor import monitor_fine_tune
    from hf_safety_merge.training import AsFTConfig, AsFTTrainer

    c, d = stages.cfg, stages.data
    torch.set_num_threads(threads)
    torch.manual_seed(c.seed)
    tok = AutoTokenizer.from_pretrained(aligned)
    model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    run_dir = Path(tempfile.mkdtemp(prefix=f"monitor-{name}-"))
    if name == "ft-full":  # Stages.break_full
        frac = c.harmful_frac if c.full_harmful_frac is None else c.full_harmful_frac
        pairs = stages.break_pairs(frac)
        args = stages.train_args(SFTConfig, run_dir, epochs=c.task_epochs, lr=c.task_lr, disable_tqdm=True)
        from trl import SFTTrainer

        trainer: Any = SFTTrainer(model=model, args=args, train_dataset=stages.dataset(pairs), processing_class=tok)
    else:  # Stages.lora_run at lambda 0 (the plain-LoRA baseline)
        pairs = stages.break_pairs()
        extra = stages.lora_args(base, aligned, 0.0)
        args = stages.train_args(AsFTConfig, run_dir, epochs=c.lora_epochs, lr=c.lora_lr, disable_tqdm=True, **extra)
        peft = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, task_type="CAUSAL_LM",
                          target_modules=list(c.lora_target_modules))
        trainer = AsFTTrainer(model=model, args=args, train_dataset=stages.dataset(pairs), processing_class=tok, peft_config=peft)
    n_harm, n_benign, n_task = sizes
    task = [(r["prompt"], r["answer"]) for r in d.task_eval[:n_task]] or None
    monitor = monitor_fine_tune(trainer, steps=every, harmful=d.eval_harmful, harmful_size=n_harm, benign=d.eval_benign,
                                benign_size=n_benign, task=task, judge=c.judge, data_dir=c.data_dir,
                                output_file=str(out_dir / f"{name}.json"))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    pts = monitor.curve
    return {"run": name, "rows": len(pairs), "steps": trainer.state.global_step, "wall_s": round(wall, 1),
            "monitor_s": round(monitor.monitor_seconds, 1), "probes": len(pts),
            "overhead_pct": round(100 * monitor.monitor_seconds / (wall - monitor.monitor_seconds), 1),
            "unsafe_start": pts[0]["unsafe"], "unsafe_end": pts[-1]["unsafe"],
            "first_eroded_step": next((p["step"] for p in pts if p.get("eroded")), None),
            "table": monitor.table()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aligned", default=str(ROOT / "demo_output" / "aligned"))
    ap.add_argument("--runs", nargs="+", default=["ft-full", "ft-lora"], choices=["ft-full", "ft-lora"])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--harmful-size", type=int, default=32)
    ap.add_argument("--benign-size", type=int, default=8)
    ap.add_argument("--task-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task-train", type=int, default=None, help="override StudyConfig.task_train (default: the full preset's 900)")
    args = ap.parse_args()

    from hf_safety_merge.assets import smollm2_checkpoint
    from hf_safety_merge.monitor import plot_curves, read_curve
    from hf_safety_merge.study.config import StudyConfig
    from hf_safety_merge.study.data import load_study_data
    from hf_safety_merge.study.stages import Stages

    cfg = StudyConfig() if args.task_train is None else StudyConfig(task_train=args.task_train)
    aligned = Path(args.aligned)
    if not (aligned / "config.json").is_file():
        raise SystemExit(f"{aligned}: not a model folder; run `hf-safety-merge demo` (or the study) first, or pass --aligned")
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="monitor-study-"))
    stages = Stages(cfg, work, load_study_data(cfg), log=lambda s: None)
    base = smollm2_checkpoint()
    summary = {"aligned": os.path.relpath(aligned, ROOT), "every": args.every, "task_train": cfg.task_train,
               "probes": {"harmful": args.harmful_size, "benign": args.benign_size, "task": args.task_size},
               "command": "python benchmarks/monitor_curves.py " + " ".join(sys.argv[1:]), "runs": []}
    old = OUT / "summary.json"
    if old.is_file():  # keep the other runs of an earlier invocation
        prev = json.loads(old.read_text()).get("runs", [])
        summary["runs"] = [r for r in prev if r["run"] not in args.runs]
    for name in args.runs:
        res = run_one(name, stages, aligned, base, args.every, OUT, args.threads,
                      (args.harmful_size, args.benign_size, args.task_size))
        print(f"\n== {name}: {res['steps']} steps, {res['wall_s']} s, monitor {res['monitor_s']} s ({res['overhead_pct']}%)\n{res['table']}")
        summary["runs"].append({**{k: v for k, v in res.items() if k != "table"}, "every": args.every,
                                "command": summary["command"], "probes_per_set": summary["probes"]})
        (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    curves = {n: read_curve(OUT / f"{n}.json") for n in ("ft-full", "ft-lora") if (OUT / f"{n}.json").is_file()}
    plot_curves(curves, OUT / "curves.png", title="Unsafe rate while fine-tuning (SmolLM2-135M, study settings)")
    print(f"wrote {OUT / 'summary.json'} and {OUT / 'curves.png'}")


if __name__ == "__main__":
    main()
