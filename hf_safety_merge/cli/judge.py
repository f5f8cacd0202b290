"""`hf-safety-merge judge train | info`: reproduce the learned judge's weights from the
human-labelled data, or show what a judge is and how well it agrees with people."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

EPILOG = """examples:
  hf-safety-merge judge train                      # rewrite the shipped weights (bit-for-bit the same)
  hf-safety-merge judge train --out /tmp/probe.safetensors --check
  hf-safety-merge judge info                       # the learned judge's recipe and measured agreement
  hf-safety-merge eval --model ./m --judge learned:/tmp/probe.safetensors
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``judge`` on an argparse subparsers object; ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "judge",
        help="the learned refusal judge: train (reproduce its weights) and info",
        description="Train the learned refusal judge from the XSTest human labels, or show a judge's recipe and agreement.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="judge_command", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="fit the probe deterministically from refusal_labels/*.csv",
                       description="Fit the learned judge's probe from <data-dir>/refusal_labels/*.csv "
                       "(features from SmolLM2-135M-Instruct; about 30 s on one CPU thread) and write it as safetensors.")
    t.add_argument("--data-dir", default=None, help="public data folder (default: $HF_SAFETY_DATA_DIR or ../shared/data)")
    t.add_argument("--out", default=None, help="output .safetensors (default: the file shipped in the package)")
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 = the reproducible default)")
    t.add_argument("--check", action="store_true", help="exit 1 unless the result is byte-identical to the shipped weights")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_train)
    i = sub.add_parser("info", help="a judge's recipe and measured agreement with human labels")
    i.add_argument("judge", nargs="?", default="learned", help="judge name or name:path (default learned)")
    i.set_defaults(func=run_info)
    return p


def run(args: argparse.Namespace) -> int:
    """The action `args.judge_command` names."""
    return run_train(args) if args.judge_command == "train" else run_info(args)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_train(args: argparse.Namespace) -> int:
    from ..eval.judges.learned import DEFAULT_WEIGHTS
    from ..eval.judges.training import train_learned_judge

    shipped = DEFAULT_WEIGHTS
    before = _sha(shipped) if shipped.is_file() else None
    out = Path(args.out) if args.out else shipped
    meta = train_learned_judge(args.data_dir, out, threads=args.threads, progress=not args.no_progress)
    digest = _sha(out)
    print(f"wrote {out} in {meta['seconds']} s (sha256 {digest})")
    for name, res in meta["agreement"].items():
        if isinstance(res, dict):
            lo, hi = res["binary_accuracy_ci95"]
            print(f"  {name}: binary accuracy {res['binary_accuracy']:.3f} [{lo:.3f}, {hi:.3f}], "
                  f"refusal recall {res['refusal_recall']:.3f}, kappa {res['kappa']:.3f}")
    if before is not None:
        same = digest == before
        print(f"  {'identical to' if same else 'DIFFERS from'} the shipped weights ({before})")
        if args.check and not same:
            return 1
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..eval.judges import get_judge

    print(json.dumps(get_judge(args.judge).describe(), indent=2))
    return 0
