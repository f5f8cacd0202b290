"""`hf-safety-merge study`: the safety-transfer study, align -> break -> repair -> evaluate (docs/study.md).
`benchmarks/safety_transfer.py` is this command with the benchmark's config and results folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import options

EPILOG = """examples:
  hf-safety-merge study --preset demo --work /tmp/study/demo      # the headline only (what `demo` runs)
  hf-safety-merge study --config benchmarks/safety_transfer.yaml --work /tmp/study/full --results results/
  hf-safety-merge study --preset full --work /tmp/study/full --report-only   # rewrite the report only

Stages are cached in --work: running the same command again resumes where it stopped.
"""

#: what --results receives from the work folder (and the report's Pareto figures)
RESULT_FILES = ("study.md", "study.json", "diagnostics.json")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study", help="the safety-transfer study: align -> break -> repair -> evaluate, config-driven (hours on a CPU)",
        description="Run the safety-transfer study (docs/study.md): safety-tune the model, break it with fine-tunes, "
        "repair it with every method and evaluate every model, with intervals and paired tests. Stages are cached "
        "in --work, so a second run resumes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser, config: str | None = None, results: str | None = None) -> None:
    """The study's options on `p`; `config` and `results` are the defaults of --config and --results."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--config", default=config,
                       help="a study config YAML: any StudyConfig field (see benchmarks/safety_transfer.yaml)"
                       + (f"; default {config}" if config else ""))
    which.add_argument("--preset", metavar="{demo,full}",
                       help="a preset instead of --config: demo (the headline only) or full (the papers' regimes)"
                       + ("" if config else "; default full"))
    p.add_argument("--work", default="study_output",
                   help="the work folder: cached stages, the report (study.md, study.json) and the figures "
                   "(default study_output)")
    p.add_argument("--results", default=results,
                   help="also copy the table, the results and the figures into this folder"
                   + (f" (default {results})" if results else ""))
    p.add_argument("--device", choices=["cpu", "cuda"], help="where training, merging and generation run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the rows already evaluated in --work (build and evaluate nothing new)")


def study_config(preset: str | None, config: str | None, **overrides: Any) -> Any:
    """The `StudyConfig` of a preset or a config file (the `full` preset when neither is given)."""
    from ..study import StudyConfig

    if config and not preset:
        return StudyConfig.from_file(config, **overrides)
    return StudyConfig.preset(preset or "full", **overrides)


def run(args: argparse.Namespace) -> int:
    from ..study import run_study

    cfg = study_config(args.preset, args.config, **options(args, "device", "threads", only_given=True))
    run_study(cfg, args.work, report_only=args.report_only)
    if args.results:
        copy_results(Path(args.work), Path(args.results))
    return 0


def copy_results(work: Path, results: Path) -> None:
    """Copy the table, the results and the Pareto figures of `work` into `results`."""
    import shutil

    results.mkdir(parents=True, exist_ok=True)
    figures = (str(p.relative_to(work)) for p in sorted((work / "report").glob("pareto_*.png")))
    for f in [*RESULT_FILES, *figures]:
        if (work / f).is_file():
            shutil.copy(work / f, results / Path(f).name)
    print(f"copied the table, results and plots to {results}")
