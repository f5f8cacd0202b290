"""EnchTable's fine stage (per-matrix SVD interference): time per matrix shape, for each exact
formulation (reference SVD, Gram/eigh rewrite; with and without pairwise threads), on the CPU
and, where available, CUDA. Also checks the formulations agree.

    python benchmarks/bench_enchtable_fine.py [--shapes smollm2|llama7b] [--repeats 3]

Prints a table and writes benchmarks/results/bench_enchtable_fine[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from hf_safety_merge.methods.interference import interference_score

SHAPES = {
    # SmolLM2-135M: q/o, k/v, gate/up, down, embed; count per model in brackets
    "smollm2": [((576, 576), 60), ((192, 576), 60), ((1536, 576), 60), ((576, 1536), 30), ((49152, 576), 1)],
    "llama7b": [((4096, 4096), 128), ((11008, 4096), 64), ((4096, 11008), 32)],
}


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def bench(shape: tuple[int, int], dev: str, backend: str, parallel: bool, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    tau = (torch.randn(shape, generator=g) * 0.02).to(dev)
    delta = (torch.randn(shape, generator=g) * 0.002).to(dev)
    interference_score(tau, delta, backend=backend, parallel=parallel)  # warm-up
    _sync(dev)
    times = []
    w = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        w, _ = interference_score(tau, delta, backend=backend, parallel=parallel)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return min(times), w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    variants = [("svd", False), ("svd", True), ("gram", False), ("gram", True)]
    rows = []
    for shape, count in SHAPES[args.shapes]:
        for dev in devices:
            for backend, parallel in variants:
                if dev == "cuda" and parallel:
                    continue  # threads only matter on the CPU
                s, w = bench(shape, dev, backend, parallel, args.repeats)
                rows.append({"shape": list(shape), "count": count, "device": dev, "backend": backend,
                             "parallel": parallel, "seconds": s, "w": w})
    ref = {(tuple(r["shape"]), r["device"]): r for r in rows if r["backend"] == "svd" and not r["parallel"]}
    print(f"threads: {torch.get_num_threads()}, cpu: {platform.machine()} x{os.cpu_count()}, "
          f"cuda: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}\n")
    print("| shape | device | backend | threads | ms / matrix | speed-up vs svd | w | per-model s (count) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    totals: dict[str, float] = {}
    for r in rows:
        base = ref[(tuple(r["shape"]), r["device"])]
        key = f"{r['device']}:{r['backend']}{'+pair' if r['parallel'] else ''}"
        totals[key] = totals.get(key, 0.0) + r["seconds"] * r["count"]
        print(f"| {r['shape'][0]}x{r['shape'][1]} | {r['device']} | {r['backend']} | {'pair' if r['parallel'] else 'intra-op'} "
              f"| {1000 * r['seconds']:.1f} | {base['seconds'] / r['seconds']:.2f} | {r['w']:.6f} | {r['seconds'] * r['count']:.2f} ({r['count']}) |")
    print("\nfine-stage total for one model (sum over its matrices):")
    for k, v in totals.items():
        print(f"  {k}: {v:.2f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_enchtable_fine_{args.shapes}{'_' + args.tag if args.tag else ''}.json"
    (out / name).write_text(json.dumps({"rows": rows, "totals": totals, "threads": torch.get_num_threads(),
                                        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
                                       indent=2) + "\n")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
