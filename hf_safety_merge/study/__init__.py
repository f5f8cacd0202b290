"""The safety-transfer study: align -> break -> repair -> evaluate on a real instruction model.

config.py (`StudyConfig`, presets) -> data.py (disjoint splits) -> stages.py (cached training and
merge stages) -> run.py (the plan) -> evaluate.py (generation + judging per model) -> stats.py
(intervals, paired tests) -> report.py (tables, verdicts, Pareto figures). Run it with
``hf-safety-merge study [--preset demo|full]`` (``hf-safety-merge demo`` runs the demo preset) or
``python benchmarks/safety_transfer.py``; docs/study.md.
"""

from .config import METHODS, StudyConfig
from .data import StudyData, arithmetic, load_study_data
from .run import run_study

__all__ = ["METHODS", "StudyConfig", "StudyData", "arithmetic", "load_study_data", "run_study"]
