"""`hf-safety-merge repair CONFIG`: search method x scale for the repair to ship and write it with its card."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_probe_backend_arguments, apply_probe_backend, options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    rp = subparsers.add_parser(
        "repair", help="search method x scale for the repair to ship (constraint-first) and write it with its card",
        description="Search EnchTable (each vector), RESTA, Safe LoRA and the TIES/DARE densities on calibration "
        "prompts disjoint from any report's; keep the over-refusal and utility constraints, minimise the unsafe rate "
        "within them, stop at the unsafe target; merge the choice once, with the whole search in its card "
        "(docs/calibration.md, \"repair\").",
        epilog="example config (YAML):\n  task_model: ./my-finetune\n  task_reference: ./aligned\n"
        "  safety_vectors: [./vector-attn, ./vector-ffn]\n  alignment_vector: ./alignment-vector  # Safe LoRA (optional)\n"
        "  calibration: {max_unsafe: 0.05, max_over_refusal_increase: 0.05, max_probes: 5}\n  check_harmful: 100\n"
        "  output_dir: ./my-finetune-repaired",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("config", help="YAML/JSON repair config (RepairConfig fields)")
    rp.add_argument("--out", help="output folder (overrides output_dir)")
    rp.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    rp.add_argument("--device", help="cpu, cuda or cuda:N")
    rp.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_probe_backend_arguments(rp)
    rp.set_defaults(func=run)
    return rp


def run(args: argparse.Namespace) -> int:
    from ..calibrate.repair import RepairConfig, repair
    from ..calibrate.search import Probe

    cfg = RepairConfig.from_file(args.config, **options(args, "overwrite", "device", output_dir="out", only_given=True))
    cal = cfg.calibration
    assert not isinstance(cal, dict)
    if args.backend or args.vllm_python:
        import dataclasses

        from ..calibrate import CalibrationConfig

        cal = cfg.calibration = CalibrationConfig.from_dict(apply_probe_backend(dataclasses.asdict(cal), args))
    cands = cfg.candidates()
    print(f"repair: searching {len(cands)} method(s) x scale on {cal.num_harmful} harmful + {cal.num_benign} benign "
          f"calibration prompts; hard constraints: over-refusal rise <= {cal.max_over_refusal_increase} "
          f"({100 * cal.confidence:.0f}% one-sided, paired); stop at unsafe <= {cal.max_unsafe}; at most "
          f"{cal.max_probes} probes per method", flush=True)
    print(f"{'method':<24} {'scale':>10}  {'unsafe':>22}  {'over-refusal':>22}  {'seconds':>7}", flush=True)

    def show(label: str, p: Probe) -> None:
        orr = f"{p.over_refusal.value:.3f} [{p.over_refusal.low:.2f}, {p.over_refusal.high:.2f}]" if p.over_refusal else "-"
        print(f"{label[:24]:<24} {p.scale:>10.4g}  {p.unsafe.value:.3f} [{p.unsafe.low:.2f}, {p.unsafe.high:.2f}]"
              f"{'':>3}  {orr:>22}  {p.seconds:>7.1f}", flush=True)

    from ..eval.engine import close_shared_engines

    try:
        result = repair(cfg, progress=not args.no_progress, on_probe=show)
    finally:
        close_shared_engines()
    print()
    print(result.table())
    print()
    for n in result.notes:
        print(f"note: {n}")
    print(result.headline())
    print(f"repaired model with its card (the whole search): {result.output_dir}")
    return 0
