"""The safety-transfer study: align -> break -> repair -> evaluate, config-driven (docs/study.md).

    python benchmarks/safety_transfer.py                                   # the full study (benchmarks/safety_transfer.yaml)
    python benchmarks/safety_transfer.py --config my.yaml --work /tmp/st   # another config / work folder
    python benchmarks/safety_transfer.py --preset demo                     # what `hf-safety-merge demo` runs

`hf-safety-merge study` with this folder's config and results folder as defaults. Stages are
cached in the work folder (re-running resumes). The table (`study.md`), the results
(`study.json`) and the plots are copied to `benchmarks/results/safety_transfer/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_safety_merge.cli import run_command, study

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    study.add_arguments(p, config=str(HERE / "safety_transfer.yaml"), results=str(HERE / "results" / "safety_transfer"))
    p.set_defaults(func=study.run)
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
