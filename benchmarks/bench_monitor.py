"""Cost of the safety monitor on the study's full fine-tune (SmolLM2-135M-Instruct, CPU).

The fine-tune mirrors the study's `break: ft-full` stage (hf_safety_merge/study/stages.py
`Stages.sft` / `train_args`, config.py defaults): a full fine-tune in fp32 on 900 arithmetic rows
(prompt/completion chat format), batch 8, max_length 160, lr 5e-5, cosine, warmup 0.1, one epoch
(113 optimiser steps). A `TrainerCallback` times every optimiser step on its own (forward, backward,
AdamW; the probe runs after it, in `on_step_end`), and the monitor times every probe (generation of
the default probe set, 16 harmful AdvBench + 8 XSTest-safe prompts, 16 new tokens, greedy, batch 16,
plus judging with the default `auto` judge). The run is cut at `--max-steps` (default 30: the step
time is steady after a few steps) with a probe every `--probe-every` steps, and the overhead of a
whole 113-step fine-tune is projected for several monitor intervals:

    overhead(N) = probes(N) * mean probe seconds / (113 * median step seconds)

with probes(N) = start + every N steps + end. `--full` runs all 113 steps (and then the measured
overhead of that run is the number to read). Both numbers are printed in one table.

    python benchmarks/bench_monitor.py                    # 30 steps, a probe every 10
    python benchmarks/bench_monitor.py --full --probe-every 50

Prints a table and writes `benchmarks/results/bench_monitor[_<tag>].json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: the study's full fine-tune (StudyConfig defaults: task_train 900, batch_size 8, max_length 160,
#: task_epochs 1, task_lr 5e-5; Stages.train_args: cosine, warmup 0.1, fp32)
STUDY_ROWS, STUDY_BATCH, STUDY_MAXLEN, STUDY_LR = 900, 8, 160, 5e-5
FULL_STEPS = math.ceil(STUDY_ROWS / STUDY_BATCH)


def probes_in_run(total_steps: int, every: int) -> int:
    """Probe runs of a monitored run: the start, every `every` steps, and the end (when no probe
    fell on the last step)."""
    if every <= 0:
        return 2
    n = 1 + total_steps // every
    return n + (0 if total_steps % every == 0 else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--full", action="store_true", help=f"run the whole {FULL_STEPS}-step fine-tune")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--judge", default="auto")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from hf_safety_merge.assets import data_dir, smollm2_checkpoint
    from hf_safety_merge.eval.judges import get_judge
    from hf_safety_merge.monitor import SafetyMonitorCallback, SafetyMonitorConfig
    from hf_safety_merge.study.data import arithmetic

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ckpt = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    rows = arithmetic(STUDY_ROWS, 1)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
    max_steps = -1 if args.full else args.max_steps
    judge = get_judge(args.judge)  # loaded before training: a one-off cost, not the monitor's per-probe cost
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as tmp:
        targs = SFTConfig(output_dir=tmp, num_train_epochs=1, max_steps=max_steps, learning_rate=STUDY_LR,
                          per_device_train_batch_size=STUDY_BATCH, lr_scheduler_type="cosine", warmup_steps=0.1,
                          logging_steps=5, save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True, bf16=False,
                          dataloader_num_workers=0, max_length=STUDY_MAXLEN, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
        cfg = SafetyMonitorConfig(steps=args.probe_every, judge=judge, data_dir=str(data_dir()), print_table=True)
        monitor = SafetyMonitorCallback(cfg, trainer=trainer)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    n_steps = len(step_times)
    step_med = statistics.median(step_times[2:] if n_steps > 4 else step_times)
    probe_s = [p["seconds"] for p in monitor.curve]
    probe_mean = statistics.mean(probe_s)
    measured = monitor.monitor_seconds / (wall - monitor.monitor_seconds)
    projections = []
    for every in (10, 25, 50, 0):
        n = probes_in_run(FULL_STEPS, every)
        projections.append({"probe_every": every, "probes": n,
                            "overhead_pct": 100 * n * probe_mean / (FULL_STEPS * step_med)})
    defaults = SafetyMonitorConfig()
    result = {
        "model": "SmolLM2-135M-Instruct", "threads": args.threads, "judge": monitor._judge.name if monitor._judge else args.judge,
        "machine": platform.machine(), "torch": torch.__version__, "load_avg_at_end": os.getloadavg(),
        "probe_set": monitor.probes.describe(), "max_new_tokens": cfg.generation_config().max_new_tokens,
        "default_monitor_steps": defaults.steps, "steps_run": n_steps, "full_run_steps": FULL_STEPS,
        "median_step_s": step_med, "probe_seconds": probe_s, "mean_probe_s": probe_mean,
        "wall_s": wall, "monitor_s": monitor.monitor_seconds, "measured_overhead_pct": 100 * measured,
        "projected": projections, "curve": [{k: p[k] for k in ("step", "label", "unsafe", "over_refusal", "seconds", "generate_seconds", "judge_seconds",
                                      "new_tokens")} for p in monitor.curve],
        "command": "python benchmarks/bench_monitor.py " + " ".join(sys.argv[1:]),
    }
    print(f"\nSafety monitor cost: SmolLM2-135M-Instruct full fine-tune, {args.threads} threads, judge {result['judge']}, "
          f"probe set {result['probe_set']}, {result['max_new_tokens']} new tokens")
    print(f"{'quantity':<52} {'value':>10}")
    print(f"{'-' * 52} {'-' * 10}")
    print(f"{'optimiser steps run':<52} {n_steps:>10}")
    print(f"{'median step (s)':<52} {step_med:>10.2f}")
    print(f"{'mean probe (s), over ' + str(len(probe_s)) + ' probes':<52} {probe_mean:>10.2f}")
    print(f"{'measured overhead of this run (probe s / train s)':<52} {100 * measured:>9.1f}%")
    for pr in projections:
        lab = f"projected, {FULL_STEPS}-step run, probe every {pr['probe_every'] or 'start/end only'} ({pr['probes']} probes)"
        print(f"{lab:<52} {pr['overhead_pct']:>9.1f}%")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_monitor{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
