"""Regenerate the measured performance tables (docs/performance.md) from the benchmarks' JSON files.

    python benchmarks/update_readme.py            # rewrite docs/performance.md between the markers
    python benchmarks/update_readme.py --check    # exit 1 if docs/performance.md is not up to date
    python benchmarks/update_readme.py --target FILE   # another Markdown file with the same markers

Reads `benchmarks/results/bench_merge_smollm2.json`, `bench_merge_synthetic-1b.json` and
`bench_asft_penalty.json` (whichever exist) and replaces the text between
`<!-- perf:begin -->` and `<!-- perf:end -->`. Every number there comes from those files. (The
tables lived in README.md until the README was cut down; the script kept its name.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET = HERE.parent / "docs" / "performance.md"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
LABELS = {
    "io_floor": "I/O floor (read task + vector once, write output once, safetensors)",
    "io_floor_raw": "raw I/O floor (the same bytes through one reused buffer: plain reads and writes)",
    "hf_safety_merge:task_arithmetic": "hf-safety-merge task arithmetic",
    "hf_safety_merge:enchtable": "hf-safety-merge EnchTable (vector with its subspace cache)",
    "hf_safety_merge:enchtable_nocache": "hf-safety-merge EnchTable (vector without the cache)",
    "hf_safety_merge:enchtable_svd": "hf-safety-merge EnchTable, naive form (the reference's two SVDs per matrix)",
    "hf_safety_merge:safe_lora": "hf-safety-merge Safe LoRA",
    "hf_safety_merge:ties": "hf-safety-merge TIES",
    "hf_safety_merge:dare": "hf-safety-merge DARE",
    "enchtable_fine_floor": "EnchTable compute floor: decompositions alone, with the cache",
    "enchtable_fine_floor_nocache": "EnchTable compute floor: decompositions alone, without the cache",
    "mergekit:task_arithmetic": "mergekit `task_arithmetic` (same result)",
}


def _per_round(r: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """The median over rounds of this run's time / the reference's time in the same round (the
    runs are interleaved, so a round's pair saw the same machine): robust where the best-of
    ratios pair a lucky run of one with an unlucky run of the other."""
    if ref is None or r.get("compute_only") or len(ref.get("seconds_all", [])) != len(r.get("seconds_all", [])):
        return "-"
    ratios = [a / b for a, b in zip(r["seconds_all"], ref["seconds_all"], strict=True)]
    return f"{statistics.median(ratios):.2f}"


def _merge_section(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    res: dict[str, Any] = d["results"]
    floor = res.get("io_floor", {}).get("seconds")
    ta = res.get("hf_safety_merge:task_arithmetic", {}).get("seconds")
    mk = res.get("mergekit:task_arithmetic", {}).get("seconds")
    load = d.get("load_average_at_end")
    out = [
        f"`python {d['command']}` ({d['model']}: {d['task_bytes'] / 2**20:.0f} MiB in {d['shards']} shard(s), largest "
        f"{d['largest_shard'] / 2**20:.0f} MiB; {d['cpu_count']} CPU cores, shared with other jobs"
        + (f", load average {load[0]:.1f} at the end" if load else "") + f"; `benchmarks/results/{path.name}`):",
        "",
        "| run | best s | median s | x I/O floor | x task arithmetic | x mergekit | x I/O floor, per round | "
        "x task arithmetic, per round | peak RSS MiB | (RSS - baseline) / largest shard |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in res.items():
        s = r["seconds"]
        med = r.get("seconds_median", s)
        rss = "-" if r.get("compute_only") else f"{r['peak_rss'] / 2**20:.0f}"
        per_shard = "-" if r.get("compute_only") else f"{(r['peak_rss'] - d['baseline_rss']) / d['largest_shard']:.2f}"
        out.append(f"| {LABELS.get(key, key)} | {s:.2f} | {med:.2f} | {s / floor:.2f} |" if floor else f"| {LABELS.get(key, key)} | {s:.2f} | {med:.2f} | - |")
        out[-1] += (f" {s / ta:.2f} |" if ta else " - |") + (f" {s / mk:.2f} |" if mk else " - |")
        out[-1] += f" {_per_round(r, res.get('io_floor'))} | {_per_round(r, res.get('hf_safety_merge:task_arithmetic'))} |"
        out[-1] += f" {rss} | {per_shard} |"
    notes = []
    for key in ("hf_safety_merge:enchtable", "hf_safety_merge:enchtable_nocache", "hf_safety_merge:task_arithmetic"):
        t = res.get(key, {}).get("timing") or {}
        for stage, v in t.items():
            notes.append(f"{LABELS.get(key, key)}, {stage.replace('_', ' ')}: {v['wall_s']:.2f} s wall; busy: read "
                         f"{v['read_s']:.2f} s, decompositions {v['prepare_s']:.2f} s (summed over workers), merge "
                         f"{v['compute_s']:.2f} s, write {v['write_s']:.2f} s; overlap {v['overlap']:.2f}")
    if d.get("subspace_cache_build_seconds"):
        notes.append(f"the vector's subspace cache was written once in {d['subspace_cache_build_seconds']:.1f} s "
                     "(at `vector compute` time; in no merge's time)")
    if notes:
        out += ["", "Stages of the best run (from each merge's `merge_report.json`; overlap 1 = stages fully concurrent, "
                "0 = one after another):", ""] + [f"- {n}" for n in notes]
    return out


def _penalty_section(path: Path) -> list[str]:
    d = json.loads(path.read_text())
    out = [f"`{d['command']}` ({d['machine']['device']}; `benchmarks/results/{path.name}`):", "",
           "| targets/projector | modules | per-module loop ms (min / median) | batched ms (min / median) | speedup (median) |",
           "| --- | --- | --- | --- | --- |"]
    for key, r in d["results"].items():
        out.append(f"| {key} | {r['modules']} | {r['loop_ms_min']:.2f} / {r['loop_ms_median']:.2f} | "
                   f"{r['batched_ms_min']:.2f} / {r['batched_ms_median']:.2f} | {r['speedup_median']:.2f}x |")
    return out


def render() -> str:
    lines: list[str] = ["<!-- generated by benchmarks/update_readme.py from benchmarks/results/*.json; do not edit by hand -->", ""]
    for name in ("bench_merge_smollm2.json", "bench_merge_synthetic-1b.json"):
        if (RESULTS / name).exists():
            lines += [*_merge_section(RESULTS / name), ""]
    for name in ("bench_asft_penalty.json", "bench_asft_penalty_cuda.json"):
        if (RESULTS / name).exists():
            lines += ["AsFT penalty, forward + backward:", "", *_penalty_section(RESULTS / name), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the target is not up to date; write nothing")
    ap.add_argument("--target", type=Path, default=TARGET, help=f"the Markdown file to rewrite (default {TARGET})")
    a = ap.parse_args(argv)
    target: Path = a.target
    text = target.read_text()
    if BEGIN not in text or END not in text:
        print(f"{target}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if a.check:
        return 0 if new == text else 1
    target.write_text(new)
    print(f"rewrote the performance tables in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
