"""Cost of calibrated repair on the real SmolLM2-135M-Instruct: calibration vs the work it must do.

    python benchmarks/bench_calibration.py [--probes 4] [--prompts 24] [--tokens 32]

The inputs are synthetic in their values (a task model = SmolLM2 + a random update, a random
safety vector), real in their shapes, files and generation: calibration's cost does not depend on
whether the patched model becomes safe. It times, in one process:

- one plain streaming EnchTable merge (`merge`, the chosen beta), the per-merge floor;
- `merge_calibrated` end to end: read + decompose once, evaluate the unpatched model, the probes
  (in-memory merge + batched greedy generation + judging), then one streaming merge that reuses
  the decompositions;

and reports calibration / (one merge + the evaluations' time), the overhead calibration adds
over the unavoidable work (issue target: <= 1.3). Prints a table, writes
benchmarks/results/bench_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.assets import smollm2_checkpoint
from hf_safety_merge.calibrate import merge_calibrated

RESULTS = Path(__file__).resolve().parent / "results"


def _inputs(work: Path) -> tuple[Path, Path, Path]:
    ref = smollm2_checkpoint()
    task = work / "task"
    if not (task / "model.safetensors").is_file():
        shutil.copytree(ref, task, dirs_exist_ok=True)
        g = torch.Generator().manual_seed(0)
        w = load_file(ref / "model.safetensors")
        vec: dict[str, torch.Tensor] = {}
        for n, t in w.items():
            if t.ndim == 2 and "embed" not in n:
                s = float(t.float().std())
                w[n] = t + 0.02 * s * torch.randn(t.shape, generator=g).to(t.dtype)
                vec[n] = 0.02 * s * torch.randn(t.shape, generator=g)
        save_file(w, task / "model.safetensors", metadata={"format": "pt"})
        SafetyVector.from_tensors(vec).save_pretrained(work / "vector", overwrite=True)
    return task, ref, work / "vector"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=24, help="harmful and benign calibration prompts each")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/hf-safety-bench-calibration")
    ap.add_argument("--data-dir", default=os.environ.get("HF_SAFETY_DATA_DIR"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    task, ref, vec = _inputs(work)
    base = dict(task_model=str(task), task_reference=str(ref), safety_vector=str(vec), method="enchtable", overwrite=True)
    cal = {"num_harmful": args.prompts, "num_benign": args.prompts, "max_new_tokens": args.tokens,
           "max_probes": args.probes, "judge": "keyword", "data_dir": args.data_dir}
    t = time.perf_counter()
    _, c = merge_calibrated(SafetyMergeConfig(**base, output_dir=str(work / "calibrated"), calibration=cal), progress=False)
    t_cal = time.perf_counter() - t
    chosen = c.value
    t = time.perf_counter()
    merge(SafetyMergeConfig(**base, parameters={"beta": chosen}, output_dir=str(work / "plain")), progress=False)
    t_merge = time.perf_counter() - t
    t_eval = c.seconds["probe_evaluation"] + c.seconds["baseline"]
    rows = {
        "one streaming EnchTable merge (beta = chosen)": t_merge,
        f"evaluations ({len(c.search.probes)} probes + the unpatched baseline)": t_eval,
        "floor: one merge + the evaluations": t_merge + t_eval,
        "calibration, end to end (merge_calibrated)": t_cal,
        "  of which: read inputs, decompose once, load the model": c.seconds["prepare"],
        "  of which: in-memory merges of the probes": c.seconds["probes"] - c.seconds["probe_evaluation"],
        "  of which: the final streaming merge": c.seconds.get("final_merge", float("nan")),
    }
    ratio = t_cal / (t_merge + t_eval)
    print(f"\nSmolLM2-135M-Instruct, {args.prompts}+{args.prompts} prompts x {args.tokens} tokens, "
          f"{len(c.search.probes)} probes, {torch.get_num_threads()} threads\n")
    print("| what | seconds |\n| --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} |")
    print(f"\ncalibration / (one merge + evaluations) = {ratio:.2f} (target <= 1.3); chosen beta {chosen:.4g}")
    RESULTS.mkdir(exist_ok=True)
    out = {"rows": rows, "ratio": ratio, "chosen": chosen, "probes": len(c.search.probes), "prompts": args.prompts,
           "tokens": args.tokens, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "torch": torch.__version__, "calibration": c.to_dict(),
           "command": "python benchmarks/bench_calibration.py " + " ".join(
               f"--{k} {getattr(args, k)}" for k in ("probes", "prompts", "tokens"))}
    (RESULTS / "bench_calibration.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
