"""The safety-transfer study: align -> break -> repair -> evaluate, config-driven (docs/study.md).

    python benchmarks/safety_transfer.py                                   # the full study (benchmarks/safety_transfer.yaml)
    python benchmarks/safety_transfer.py --config my.yaml --work /tmp/st   # another config / work folder
    python benchmarks/safety_transfer.py --preset demo                     # what `hf-safety-merge demo` runs

Stages are cached in the work folder (re-running resumes). The table (`study.md`), the results
(`study.json`) and the plots are copied to `benchmarks/results/safety_transfer/`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from hf_safety_merge.study import StudyConfig, run_study

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "safety_transfer.yaml"))
    p.add_argument("--preset", choices=["demo", "full"], help="use a preset instead of --config")
    p.add_argument("--work", default="study_output")
    p.add_argument("--results", default=str(HERE / "results" / "safety_transfer"))
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the rows already evaluated in --work (build and evaluate nothing new)")
    a = p.parse_args(argv)
    over = {k: v for k, v in (("device", a.device), ("threads", a.threads)) if v}
    cfg = StudyConfig.preset(a.preset, **over) if a.preset else StudyConfig.from_file(a.config, **over)
    run_study(cfg, a.work, report_only=a.report_only)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    for f in ["study.md", "study.json", "diagnostics.json", *(str(p.relative_to(work)) for p in sorted((work / "report").glob("pareto_*.png")))]:
        if (work / f).is_file():
            shutil.copy(work / f, res / Path(f).name)
    print(f"copied the table, results and plots to {res}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
