"""`hf-safety-merge vector compute | info`: compute or inspect safety vectors."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._common import options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    v = subparsers.add_parser("vector", help="compute or inspect safety vectors")
    vsub = v.add_subparsers(dest="vector_command", required=True, metavar="ACTION")
    vc = vsub.add_parser("compute", help="Delta_s = aligned - reference, streamed, saved as safetensors",
                         description="Compute a safety vector `aligned - reference` over a tensor selection.")
    vc.add_argument("--aligned", required=True, help="aligned checkpoint (folder or Hub id)")
    vc.add_argument("--reference", required=True, help="reference checkpoint, e.g. a harmful fine-tune of the aligned model")
    vc.add_argument("--out", required=True, help="output folder")
    vc.add_argument("--scope", default="all", choices=["all", "attention", "mlp", "attention+mlp"])
    vc.add_argument("--layers", type=int, nargs=2, metavar=("START", "END"), help="only layers in [START, END)")
    vc.add_argument("--include", action="append", help="regex a tensor name must match (repeatable)")
    vc.add_argument("--exclude", action="append", help="regex excluding tensor names (repeatable)")
    vc.add_argument("--min-ndim", type=int, default=2, help="2 = weight matrices only (default); 1 = also norms/biases")
    vc.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    vc.add_argument("--aligned-revision")
    vc.add_argument("--reference-revision")
    vc.add_argument("--max-shard-size", default="5GB")
    vc.add_argument("--allow-pickle", action="store_true")
    vc.add_argument("--overwrite", action="store_true")
    vc.add_argument("--no-progress", action="store_true")
    vc.set_defaults(func=run_compute)
    vi = vsub.add_parser("info", help="show a safety vector's provenance and norms")
    vi.add_argument("path")
    vi.set_defaults(func=run_info)
    return v


def run(args: argparse.Namespace) -> int:
    """The action `args.vector_command` names."""
    return run_compute(args) if args.vector_command == "compute" else run_info(args)


def run_compute(args: argparse.Namespace) -> int:
    from ..io.filters import TensorFilter
    from ..vectors import SafetyVector

    tf = TensorFilter(
        scope=args.scope,
        layers=tuple(args.layers) if args.layers else None,
        include=args.include or [],
        exclude=args.exclude or [],
        min_ndim=args.min_ndim,
    )
    vec = SafetyVector.compute(
        args.aligned, args.reference, args.out, tensor_filter=tf, progress=not args.no_progress,
        **options(args, "dtype", "aligned_revision", "reference_revision", "max_shard_size", "allow_pickle", "overwrite"),
    )
    print(f"wrote {vec!r} to {args.out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..vectors import SafetyVector

    vec = SafetyVector.from_pretrained(args.path)
    d = asdict(vec.config)
    norms = d.pop("tensor_norms")
    print(json.dumps(d, indent=2))
    print(f"{len(norms)} tensors; largest norms:")
    for n, v in sorted(norms.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {v:10.4g}  {n}")
    return 0
