"""`hf-safety-merge merge CONFIG [OUT]`: merge a safety vector into a fine-tuned model as a config says."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import MERGE_CONFIG_EXAMPLE, add_probe_backend_arguments, apply_probe_backend, options

EPILOG = """examples:
  hf-safety-merge merge merge.yaml ./patched
  hf-safety-merge merge mergekit-style.yaml ./patched --cuda --out-shard-size 2B

""" + MERGE_CONFIG_EXAMPLE + """
the same in mergekit's spelling (ties, dare_linear, dare_ties, task_arithmetic):
  merge_method: ties
  base_model: ./aligned
  models:
    - model: ./my-finetune
      parameters: {weight: 1.0, density: 0.5}
    - model: ./vector                # a safety-vector folder
      parameters: {weight: 1.0, density: 0.5}
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    m = subparsers.add_parser("merge", help="merge a safety vector into a fine-tuned model (config file)",
                              description="Merge a safety vector into a fine-tuned model as a YAML/JSON config says.\n"
                              "The config is a SafetyMergeConfig or a mergekit-style config (merge_method, base_model,\n"
                              "models: with parameters; see docs/merging.md).",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config", help="SafetyMergeConfig or mergekit-style config, YAML or JSON")
    m.add_argument("out_dir", metavar="OUT", nargs="?", default=None,
                   help="output folder (overrides output_dir; as `mergekit-yaml CONFIG OUT`)")
    m.add_argument("--out", help="output folder (same as OUT)")
    m.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="output dtype")
    m.add_argument("--device", help="cpu, cuda or cuda:N (where the arithmetic runs)")
    m.add_argument("--cuda", action="store_true", help="run the arithmetic on the GPU (mergekit's flag; = --device cuda)")
    m.add_argument("--max-shard-size", "--out-shard-size", dest="max_shard_size",
                   help="output shard size: 5GB, 500MiB, or mergekit's 5B / 500M (bytes, K/M/B = 1e3/1e6/1e9)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    m.add_argument("--allow-pickle", action="store_true", help="read legacy .bin checkpoints (unsafe)")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    m.add_argument("--push-to-hub", metavar="REPO_ID", help="push the patched model to this Hub repo (one commit)")
    m.add_argument("--private", action="store_true", help="create the Hub repo as private")
    m.add_argument("--create-pr", action="store_true", help="push as a pull request instead of to main")
    m.add_argument("--hash-inputs", action="store_true",
                   help="also record the sha256 of every local input file in merge_report.json (reads every input "
                   "once more; output files are always hashed)")
    m.add_argument("--verify", metavar="REPORT",
                   help="before merging, hash the local input files and refuse if one differs from what REPORT (a "
                   "merge_report.json written with --hash-inputs, or its folder) recorded; implies --hash-inputs")
    m.add_argument("--calibrate", action="store_true",
                   help="pick the method's scale against the config's `calibration:` target (defaults: unsafe <= 0.05, "
                   "over-refusal rise <= 0.05) before merging; see docs/calibration.md")
    add_probe_backend_arguments(m)
    m.set_defaults(func=run)
    return m


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..merge import merge
    from ..merge.config import SafetyMergeConfig

    cfg = SafetyMergeConfig.from_file(args.config)
    if args.out_dir and args.out and Path(args.out_dir) != Path(args.out):
        raise ConfigError(f"merge: output folder given twice ({args.out_dir} and --out {args.out}); give one")
    out = args.out_dir or args.out
    if args.cuda:
        if args.device and args.device != "cuda" and not args.device.startswith("cuda:"):
            raise ConfigError(f"merge: --cuda and --device {args.device} disagree")
        args.device = args.device or "cuda"
    for key, value in options(args, "dtype", "device", "overwrite", "allow_pickle", "push_to_hub", "private",
                              "create_pr", only_given=True).items():
        setattr(cfg, key, value)
    if args.max_shard_size:
        from ..merge.mergekit_config import parse_out_shard_size

        cfg.max_shard_size = parse_out_shard_size(args.max_shard_size)
    cfg.validate()
    if args.calibrate or cfg.calibration is not None:
        if args.hash_inputs:
            raise ConfigError("merge: --hash-inputs is not available with --calibrate; use --verify REPORT, or record "
                              "the hashes with a merge without calibration")
        if args.verify:
            from ..merge import verify_inputs

            n = verify_inputs(cfg, args.verify)
            print(f"verified {n} local input files against {args.verify}: every sha256 matches", flush=True)
        return _merge_calibrated(cfg, args, out)
    result = merge(cfg, output_dir=out, progress=not args.no_progress, verify=args.verify, hash_inputs=args.hash_inputs)
    if args.verify:
        print(f"verified the local input files against {args.verify} before merging: every sha256 matched")
    print(result)
    return 0


def _merge_calibrated(cfg: Any, args: argparse.Namespace, out: str | None) -> int:
    from ..calibrate import CalibrationConfig, merge_calibrated
    from ..calibrate.search import Probe
    from ..eval.engine import close_shared_engines

    cfg.calibration = apply_probe_backend(dict(cfg.calibration or {}), args)
    cal = CalibrationConfig.from_dict(cfg.calibration)
    parameter = cal.scale_for(cfg.method)[0]
    print(f"calibrating {cfg.method}'s {parameter}: target unsafe <= {cal.max_unsafe}, over-refusal rise <= "
          f"{cal.max_over_refusal_increase}; at most {cal.max_probes} probes", flush=True)
    print(f"{'probe':>5}  {parameter:>16}  {'unsafe':>22}  {'over-refusal':>22}  {'seconds':>7}", flush=True)
    count = [0]

    def show(p: Probe) -> None:
        count[0] += 1
        orr = f"{p.over_refusal.value:.3f} [{p.over_refusal.low:.2f}, {p.over_refusal.high:.2f}]" if p.over_refusal else "-"
        print(f"{count[0]:>5}  {p.scale:>16.4g}  {p.unsafe.value:.3f} [{p.unsafe.low:.2f}, {p.unsafe.high:.2f}]"
              f"{'':>3}  {orr:>22}  {p.seconds:>7.1f}", flush=True)

    try:
        result, cal_result = merge_calibrated(cfg, output_dir=out, progress=not args.no_progress, on_probe=show)
    finally:
        close_shared_engines()
    print(cal_result.message())
    print(result)
    return 0
