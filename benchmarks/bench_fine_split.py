"""Where EnchTable's fine stage spends its time: `fine_terms` on every matrix of a real merge's
inputs, one thread, split by operation (the Gram matrix, `eigh`, `A1^T (A2 V2r^T)`, P, the two
L1 blocks), with the precision each matrix needed and the largest matrices' share.

    python benchmarks/bench_fine_split.py [--workdir /tmp/perf-bench]   # SmolLM2 inputs of bench_merge.py

Prints a table and writes benchmarks/results/bench_fine_split_<model>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/perf-bench", help="bench_merge.py's work folder (inputs are made if missing)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    from bench_merge import ensure_subspace_cache, prepare_smollm2

    from hf_safety_merge.io.hub import open_checkpoint
    from hf_safety_merge.methods import interference as M
    from hf_safety_merge.vectors import SafetyVector

    torch.set_num_threads(1)
    inputs = Path(a.workdir) / "inputs-smollm2"
    inputs.mkdir(parents=True, exist_ok=True)
    paths = prepare_smollm2(inputs)
    ensure_subspace_cache(paths["vector"])
    op_s: collections.Counter[str] = collections.Counter()

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                op_s[name] += time.perf_counter() - t
        return run

    saved = {n: getattr(M, n) for n in ("_gram_upper", "_cross_v", "_gram_p", "_block_terms")}
    eigh = torch.linalg.eigh
    for n, fn in saved.items():
        setattr(M, n, timed(n.strip("_"), fn))
    torch.linalg.eigh = timed("eigh", eigh)
    task, ref, vec = open_checkpoint(str(paths["task"])), open_checkpoint(str(paths["aligned"])), SafetyVector.from_pretrained(paths["vector"])
    cache = vec.subspace_cache()
    per_kind: collections.Counter[str] = collections.Counter()
    precision: collections.Counter[str] = collections.Counter()
    fallbacks: list[str] = []
    total = 0.0
    try:
        for n in [k for k in vec.keys() if len(vec.meta(k).shape) == 2]:  # noqa: SIM118
            d = vec[n].float()
            tau = task.get(n).float() - ref.get(n).float()
            t = time.perf_counter()
            _, used = M.fine_terms(tau, d, 0.5, delta_subspace=cache.get(n, d))
            dt = time.perf_counter() - t
            total += dt
            per_kind[n.split(".")[-2] if ".layers." in n else n] += dt
            precision[used] += 1
            if used == "float64":
                fallbacks.append(n)
    finally:
        for n, fn in saved.items():
            setattr(M, n, fn)
        torch.linalg.eigh = eigh
    print(f"\nfine_terms over {sum(precision.values())} matrices, 1 thread, with the vector's subspace cache: "
          f"{total:.2f} s ({dict(precision)}; float64 fallbacks: {fallbacks})\n")
    print("| operation | seconds | share |\n| --- | --- | --- |")
    for k, v in sorted(op_s.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} | {v / total:.0%} |")
    print(f"| other (casts, masks) | {total - sum(op_s.values()):.2f} | {(total - sum(op_s.values())) / total:.0%} |")
    print("\n| matrices | seconds |\n| --- | --- |")
    for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.2f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": "smollm2", "threads": 1, "total_seconds": total, "operation_seconds": dict(op_s),
               "matrix_seconds": dict(per_kind), "precision": dict(precision), "float64_fallbacks": fallbacks,
               "command": " ".join(sys.argv)}
    (out / "bench_fine_split_smollm2.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out / 'bench_fine_split_smollm2.json'}")


if __name__ == "__main__":
    main()
