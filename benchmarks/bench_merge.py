"""Merge throughput and peak memory, side by side in one run:

- this library's task arithmetic (RESTA) and EnchTable (with and without the vector's subspace
  cache, and its naive form: the reference's two SVDs per matrix), Safe LoRA, TIES and DARE,
- mergekit (`mergekit-yaml` with `task_arithmetic` on the same inputs), if a mergekit
  installation is given (`--mergekit-bin`; installed in its own virtual environment),
- the I/O floor: read every input tensor once and write the output once with safetensors,
  no arithmetic (issue 20's reference), and the raw I/O floor (`raw_floor`): the same bytes
  copied through one reused buffer with plain reads and writes, no library in between,
- EnchTable's compute floor: its decompositions alone, on the merge's own worker layout.

Each run is a separate process (peak RSS is its own: VmHWM polled from /proc), repeated
`--repeats` times, interleaved (floor, A, B, then A, B, floor, ...: each round starts one run
later) with every output deleted and the page cache's dirty pages written back (`sync`) before
its run; the table reports the best and median wall time, ratios to the floor, to task
arithmetic and to mergekit, and peak RSS vs the largest input shard.

    python benchmarks/bench_merge.py --model smollm2 [--mergekit-bin .venv-mergekit/bin/mergekit-yaml]
    python benchmarks/bench_merge.py --model synthetic-1b --shards 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FLOOR_SCRIPT = r'''
import sys, json
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
# I/O floor: read every input tensor once (task model + safety vector), write the output once.
task, vec, out = map(Path, sys.argv[1:4])
out.mkdir(parents=True, exist_ok=True)
vec_files = sorted(vec.glob("safety_vector*.safetensors"))
for i, f in enumerate(sorted(task.glob("model*.safetensors"))):
    tensors = {}
    with safe_open(f, "pt") as fh:
        for k in fh.keys():
            tensors[k] = fh.get_tensor(k)
    save_file(tensors, out / f.name, metadata={"format": "pt"})
for f in vec_files:
    with safe_open(f, "pt") as fh:
        for k in fh.keys():
            fh.get_tensor(k).sum()
# the CLI's fast exit (hf_safety_merge.cli.main): shutdown does not walk torch's objects (~0.3 s);
# the floor gets it too, so that it stays a floor
import gc
gc.freeze()
'''


RAW_FLOOR_SCRIPT = r'''
import gc, sys
from pathlib import Path
import torch  # noqa: F401  (every merge process imports it; so does this floor)
# The raw I/O floor: the same bytes as the I/O floor moved with no library in between: each task
# file read once into one reused 64 MiB buffer and written out from it, the vector read likewise.
task, vec, out = map(Path, sys.argv[1:4])
out.mkdir(parents=True, exist_ok=True)
view = memoryview(bytearray(64 << 20))
for f in sorted(task.glob("model*.safetensors")):
    with open(f, "rb", buffering=0) as src, open(out / f.name, "wb", buffering=0) as dst:
        while n := src.readinto(view):
            dst.write(view[:n])
for f in sorted(vec.glob("safety_vector*.safetensors")):
    with open(f, "rb", buffering=0) as src:
        while src.readinto(view):
            pass
gc.freeze()
'''


FINE_FLOOR_SCRIPT = r'''
import json, math, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
from hf_safety_merge.io.hub import open_checkpoint
from hf_safety_merge.methods.interference import fine_terms
from hf_safety_merge.vectors import SafetyVector
# EnchTable's compute floor: the fine stage's decompositions alone (tau = task - reference and
# Delta_s already in memory, a layer's worth at a time; no reads or writes timed), on the
# merge's own worker layout (one intra-op thread per worker, as many workers as threads).
task, ref, vec = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2]), SafetyVector.from_pretrained(sys.argv[3])
use_cache = sys.argv[4] == "1"
cache = vec.subspace_cache() if use_cache else None
threads = torch.get_num_threads()
workers = max(1, min(4, threads))
names = [n for n in vec.keys() if len(vec.meta(n).shape) == 2]
busy = 0.0
chunk_bytes = 4 * max(math.prod(vec.meta(n).shape) for n in names)
with ThreadPoolExecutor(workers, initializer=lambda: torch.set_num_threads(max(1, threads // workers))) as ex:
    i = 0
    while i < len(names):
        batch, size = [], 0
        while i < len(names) and (not batch or size + 4 * math.prod(vec.meta(names[i]).shape) <= 2 * chunk_bytes):
            n = names[i]
            d = vec[n].float()
            batch.append((n, task.get(n).float() - ref.get(n).float(), d))
            size += 4 * d.numel()
            i += 1
        def one(item):
            n, tau, d = item
            sub = cache.get(n, d) if cache is not None else None
            return fine_terms(tau, d, 0.5, delta_subspace=sub)
        t = time.perf_counter()
        list(ex.map(one, batch))
        busy += time.perf_counter() - t
print(json.dumps({"seconds": busy, "matrices": len(names), "workers": workers, "cache": cache is not None}))
'''


#: the merges this benchmark can time (each a `hf-safety-merge merge` process)
MERGE_RUNS = ("task_arithmetic", "enchtable", "enchtable_nocache", "enchtable_svd", "safe_lora", "ties", "dare")


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all waited-for children: run each case in a fresh
    # wrapper so the number is this child's own peak.
    return wall, max(after, before) * 1024


def _peak_wrapper(cmd: list[str]) -> list[str]:
    # The child's own peak (VmHWM of its process image), read by polling /proc while it runs:
    # ru_maxrss would include the high-water mark Linux carries over fork + exec from the parent.
    code = (
        "import subprocess, sys, time, json\n"
        "def hwm(pid):\n"
        "    try:\n"
        "        for line in open(f'/proc/{pid}/status'):\n"
        "            if line.startswith('VmHWM:'): return int(line.split()[1]) * 1024\n"
        "    except OSError: return 0\n"
        "    return 0\n"
        "t = time.perf_counter(); p = subprocess.Popen(sys.argv[1:]); peak = 0\n"
        "while p.poll() is None:\n"
        "    peak = max(peak, hwm(p.pid)); time.sleep(0.02)\n"
        "w = time.perf_counter() - t\n"
        "print(json.dumps({'rc': p.returncode, 'wall': w, 'rss': peak}))\n"
    )
    return [sys.executable, "-c", code, *cmd]


def measure(cmd: list[str], repeats: int, cleanup: Path | None = None, env: dict[str, str] | None = None) -> dict[str, float]:
    walls, rss = [], []
    for _ in range(repeats):
        if cleanup is not None and cleanup.exists():
            shutil.rmtree(cleanup)
        # no dirty pages of an earlier run's output left to write back during this one (on 2
        # cores that writeback competes with the run)
        os.sync()
        r = subprocess.run(_peak_wrapper(cmd), capture_output=True, text=True, env=env)
        lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if lines else {"rc": 1}
        if res["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        walls.append(res["wall"])
        rss.append(res["rss"])
    return {"seconds": min(walls), "seconds_all": walls, "peak_rss": max(rss)}


def warm_memory(gib: float) -> None:
    """Touch `gib` GiB of anonymous memory, 1 GiB at a time, then free it (see --warm-memory)."""
    import numpy as np

    t0 = time.perf_counter()
    blocks = [np.ones(2**30, dtype=np.uint8) for _ in range(int(gib))]
    del blocks
    print(f"touched {int(gib)} GiB of memory in {time.perf_counter() - t0:.1f} s")


def prepare_smollm2(root: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_safety_merge import SafetyVector
    from hf_safety_merge.assets import smollm2_checkpoint
    from hf_safety_merge.testing.models import perturb

    base = smollm2_checkpoint()
    paths = {"aligned": base}
    for name, seed, scale in (("harmful", 1, 0.01), ("task", 2, 0.02)):
        p = root / name
        if not (p / "model.safetensors").exists():
            m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            perturb(m, scale, seed)
            m.save_pretrained(p)
        paths[name] = p
    if not (root / "vector" / "safety_vector_config.json").exists():
        SafetyVector.compute(base, paths["harmful"], root / "vector", progress=False, overwrite=True, subspaces=False)
    paths["vector"] = root / "vector"
    return paths


def ensure_subspace_cache(vector: Path) -> float | None:
    """Write the vector's subspace cache if it is missing (as `vector compute` does); the
    seconds it took (a one-off cost, not part of any merge), or None if it was there."""
    from hf_safety_merge.vectors import SUBSPACE_CACHE, write_subspace_cache

    if (vector / SUBSPACE_CACHE).exists():
        return None
    t = time.perf_counter()
    write_subspace_cache(vector)
    return time.perf_counter() - t


def prepare_synthetic(root: Path, n_layers: int, hidden: int, inter: int, vocab: int, shards: int,
                      heads: int | None = None, kv_heads: int | None = None) -> dict[str, Path]:
    """Random weights of a Llama layout (~1B parameters with the defaults), sharded."""
    from _synthetic import write_synthetic

    heads = heads or hidden // 64
    kv_heads = kv_heads or max(1, heads // 4)
    kv = hidden // heads * kv_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    total = sum(int(__import__("math").prod(s)) for s in shapes.values()) * 4
    shard = total // shards + 1
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": n_layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "dtype": "float32"}
    paths: dict[str, Path] = {}
    for name, seed in (("aligned", 1), ("task", 2)):
        p = root / name
        if not (p / "config.json").exists():
            write_synthetic(p, shapes, seed, shard, config=config)
        paths[name] = p
    vec = root / "vector"
    if not (vec / "safety_vector_config.json").exists():
        vshapes = {k: v for k, v in shapes.items() if len(v) == 2}
        write_synthetic(vec, vshapes, 3, shard, prefix="safety_vector", scale=0.001)
        (vec / "safety_vector_config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM", "norm": 1.0}))
    paths["vector"] = vec
    paths["shard_bytes"] = Path(str(shard))
    return paths


def byte_compile_package() -> int:
    """Write the package's bytecode (`__pycache__`, git-ignored), as `pip install` does for an
    installed package: a source checkout run with PYTHONDONTWRITEBYTECODE=1 (this machine's
    setting) otherwise compiles every module of the package from source in every run (35
    modules, ~0.04 s of each merge's start-up). Returns the number of modules."""
    import compileall

    import hf_safety_merge

    pkg = Path(hf_safety_merge.__file__).parent
    if not compileall.compile_dir(str(pkg), quiet=1):
        raise SystemExit(f"could not byte-compile {pkg}")
    return sum(1 for _ in pkg.rglob("*.py"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "synthetic-smollm2", "synthetic-1b", "synthetic-small"], default="smollm2")
    ap.add_argument("--device", default="cpu", help="where the merge arithmetic runs (cpu, cuda)")
    ap.add_argument("--enchtable-params", default="{}", help='JSON, e.g. \'{"backend": "gram", "parallel": true}\'')
    ap.add_argument("--shards", type=int, default=8, help="shards of the synthetic checkpoints")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mergekit-bin", default=str(HERE.parent / ".venv-mergekit" / "bin" / "mergekit-yaml"))
    ap.add_argument("--methods", default="floor,task_arithmetic,enchtable,enchtable_nocache,fine_floor,mergekit",
                    help="comma list of: floor (I/O floor), raw_floor (raw I/O floor), task_arithmetic, enchtable (with the vector's subspace "
                         "cache), enchtable_nocache (without it), enchtable_svd (the naive form: the reference's two "
                         "SVDs per matrix), safe_lora, ties, dare (for their peak memory), fine_floor (EnchTable's "
                         "decompositions alone, with and without the cache; fine_floor_cached: with it only), mergekit")
    ap.add_argument("--warm-memory", type=float, default=0.0, metavar="GIB",
                    help="touch this many GiB of memory once before timing (on a VM whose memory the host backs "
                         "lazily, the first touch of a page costs ~12 us: 19 GiB took 58 s of system time here, and "
                         "runs that land on never-touched pages are slower; 0 = off)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.warm_memory > 0:
        warm_memory(args.warm_memory)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    inputs = work / f"inputs-{args.model}"
    inputs.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        paths = prepare_smollm2(inputs)
    elif args.model == "synthetic-smollm2":
        paths = prepare_synthetic(inputs, n_layers=30, hidden=576, inter=1536, vocab=49152, shards=args.shards, heads=9, kv_heads=3)
    elif args.model == "synthetic-1b":
        paths = prepare_synthetic(inputs, n_layers=16, hidden=2048, inter=5632, vocab=32000, shards=args.shards)
    else:
        paths = prepare_synthetic(inputs, n_layers=4, hidden=512, inter=1024, vocab=4000, shards=args.shards)
    shard_files = sorted(paths["task"].glob("model*.safetensors"))
    largest_shard = max(f.stat().st_size for f in shard_files)
    in_bytes = sum(f.stat().st_size for f in shard_files)

    results: dict[str, dict[str, Any]] = {}
    methods = args.methods.split(",")
    n_compiled = byte_compile_package()
    cache_build = ensure_subspace_cache(paths["vector"]) if any(m.startswith(("enchtable", "fine_floor")) for m in methods) else None
    py = sys.executable
    # RSS of a process that only imports what a merge imports: subtracted to show what the
    # merge itself holds (the target is stated in multiples of the largest shard).
    baseline = measure([py, "-c", "import torch, safetensors, hf_safety_merge.cards, hf_safety_merge.merge"], 1)["peak_rss"]
    runs: list[tuple[str, list[str], Path]] = []
    if "floor" in methods:
        floor_script = work / "floor.py"
        floor_script.write_text(FLOOR_SCRIPT)
        runs.append(("io_floor", [py, str(floor_script), str(paths["task"]), str(paths["vector"]), str(work / "out-floor")],
                     work / "out-floor"))
    if "raw_floor" in methods:
        raw_script = work / "raw_floor.py"
        raw_script.write_text(RAW_FLOOR_SCRIPT)
        runs.append(("io_floor_raw", [py, str(raw_script), str(paths["task"]), str(paths["vector"]), str(work / "out-raw-floor")],
                     work / "out-raw-floor"))
    for method in MERGE_RUNS:
        if method not in methods:
            continue
        cfg = work / f"{method}.yaml"
        if method.startswith("enchtable"):
            params = json.loads(args.enchtable_params)
            if method == "enchtable_nocache":
                params["subspace_cache"] = False
            if method == "enchtable_svd":  # the naive form: the reference's two SVDs per matrix
                params.update(backend="svd", subspace_cache=False)
        else:
            params = {"beta": 1.0} if method == "task_arithmetic" else {}
        cfg.write_text(json.dumps({"task_model": str(paths["task"]), "task_reference": str(paths["aligned"]),
                                   "safety_vector": str(paths["vector"]), "method": method.split("_nocache")[0].split("_svd")[0],
                                   "parameters": params, "output_dir": str(work / f"out-{method}"), "overwrite": True,
                                   "device": args.device, "max_shard_size": largest_shard}))
        runs.append((method, [py, "-m", "hf_safety_merge.cli", "merge", str(cfg), "--no-progress"], work / f"out-{method}"))
    mk = Path(args.mergekit_bin)
    if "mergekit" in methods and mk.exists():
        # task arithmetic in mergekit: base = aligned; models: task (w=1) and aligned+vector is not a
        # checkpoint, so give mergekit what it needs for the same arithmetic: a "safety" model
        # aligned + Delta (materialised once, outside the timing).
        safety_model = inputs / "aligned_plus_vector"
        if not (safety_model / "config.json").exists():
            _materialise(paths["aligned"], paths["vector"], safety_model)
        yaml_cfg = work / "mergekit.yaml"
        yaml_cfg.write_text(
            "merge_method: task_arithmetic\n"
            f"base_model: {paths['aligned']}\n"
            "models:\n"
            f"  - model: {paths['task']}\n    parameters:\n      weight: 1.0\n"
            f"  - model: {safety_model}\n    parameters:\n      weight: 1.0\n"
            "dtype: float32\n"
        )
        runs.append(("mergekit", [str(mk), str(yaml_cfg), str(work / "out-mergekit"), "--lazy-unpickle",
                                  "--out-shard-size", str(largest_shard)], work / "out-mergekit"))
    elif "mergekit" in methods:
        print(f"(mergekit not found at {mk}; skipped. Install it in its own venv: python -m venv .venv-mergekit && "
              ".venv-mergekit/bin/pip install torch==2.13.0 mergekit)")

    # Interleaved (floor A B C, A B C floor, ...): a comparison holds when a shared machine's speed
    # drifts; each round starts one run later, so no run always follows the same one (the one after a
    # short run may meet that run's output still being written back, or its freed memory); and
    # the page cache is in the same state for each (every output is deleted first, then `sync`).
    def key(method: str) -> str:
        return {"io_floor": "io_floor", "io_floor_raw": "io_floor_raw",
                "mergekit": "mergekit:task_arithmetic"}.get(method, f"hf_safety_merge:{method}")

    for rnd in range(args.repeats):
        for method, cmd, out_dir in runs[rnd % len(runs):] + runs[:rnd % len(runs)]:
            r = measure(cmd, 1, out_dir)
            acc = results.setdefault(key(method), {"seconds_all": [], "peak_rss": 0})
            acc["seconds_all"] += r["seconds_all"]
            acc["peak_rss"] = max(acc["peak_rss"], r["peak_rss"])
            if method not in ("io_floor", "io_floor_raw", "mergekit"):
                report = json.loads((out_dir / "merge_report.json").read_text())
                acc.setdefault("timing_all", []).append(report.get("timing", {}))
    for method, _, _ in runs:
        acc = results[key(method)]
        acc["seconds"] = min(acc["seconds_all"])
        acc["seconds_median"] = statistics.median(acc["seconds_all"])
        if "timing_all" in acc:
            acc["timing"] = acc["timing_all"][acc["seconds_all"].index(acc["seconds"])]
    if "fine_floor" in methods or "fine_floor_cached" in methods:
        script = work / "fine_floor.py"
        script.write_text(FINE_FLOOR_SCRIPT)
        floors = (("enchtable_fine_floor", "1"), ("enchtable_fine_floor_nocache", "0"))
        for label, use in floors if "fine_floor" in methods else floors[:1]:
            walls = []
            for _ in range(args.repeats):
                r = subprocess.run([py, str(script), str(paths["task"]), str(paths["aligned"]), str(paths["vector"]), use],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(r.stderr[-3000:])
                walls.append(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])
            results[label] = {"seconds": min(walls), "seconds_all": walls, "seconds_median": statistics.median(walls),
                              "peak_rss": 0, "compute_only": True}
    floor = results.get("io_floor", {}).get("seconds")
    mkt = results.get("mergekit:task_arithmetic", {}).get("seconds")
    ta = results.get("hf_safety_merge:task_arithmetic", {}).get("seconds")
    print(f"\nmodel: {args.model}; task checkpoint {in_bytes / 2**20:.0f} MiB in {len(shard_files)} shard(s), "
          f"largest {largest_shard / 2**20:.0f} MiB; {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print(f"baseline RSS (python + torch imported): {baseline / 2**20:.0f} MiB\n")
    print("| run | seconds (best) | x I/O floor | x mergekit | x task arithmetic | peak RSS MiB | (RSS - baseline) / largest shard |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        s = r["seconds"]
        print(f"| {name} | {s:.2f} | {s / floor:.2f} |" if floor else f"| {name} | {s:.2f} | - |", end="")
        print(f" {s / mkt:.2f} |" if mkt else " - |", end="")
        print(f" {s / ta:.2f} |" if ta else " - |", end="")
        if r.get("compute_only"):
            print(" - | - |")
        else:
            print(f" {r['peak_rss'] / 2**20:.0f} | {(r['peak_rss'] - baseline) / largest_shard:.2f} |")
    for name, r in results.items():
        for stage, t in (r.get("timing") or {}).items():
            print(f"{name} {stage}: wall {t['wall_s']:.2f} s; busy read {t['read_s']:.2f}, decompositions {t['prepare_s']:.2f}, "
                  f"merge {t['compute_s']:.2f}, write {t['write_s']:.2f} s; overlap {t['overlap']:.2f}")
    if cache_build is not None:
        print(f"subspace cache written once for this vector in {cache_build:.1f} s (at `vector compute` time; not in any merge)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "device": args.device, "task_bytes": in_bytes, "shards": len(shard_files), "largest_shard": largest_shard,
               "cpu_count": os.cpu_count(), "baseline_rss": baseline, "results": results,
               "subspace_cache_build_seconds": cache_build, "load_average_at_end": os.getloadavg(),
               "package_bytecode": f"{n_compiled} modules byte-compiled before timing, as pip install does",
               "command": " ".join(sys.argv)}
    (out / f"bench_merge_{args.model}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out / f'bench_merge_{args.model}.json'}")


def _materialise(aligned: Path, vector: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    vec: dict = {}
    for f in vector.glob("safety_vector*.safetensors"):
        vec.update(load_file(f))
    for f in aligned.glob("model*.safetensors"):
        t = load_file(f)
        for k in t:
            if k in vec:
                t[k] = t[k] + vec[k].to(t[k].dtype)
        save_file(t, out / f.name, metadata={"format": "pt"})
    for f in aligned.iterdir():
        if (f.suffix == ".json" or f.name.startswith("tokenizer")) and not (out / f.name).exists():
            shutil.copy(f, out / f.name)


if __name__ == "__main__":
    main()
