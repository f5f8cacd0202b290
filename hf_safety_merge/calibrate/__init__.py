"""Calibrated repair: a merge's scale chosen constraint-first (`calibration:`), and `repair`, the search
across methods x scales that writes the repair to ship.

Layer 6 (docs/architecture.md): may import the merge engine, `vectors`, `config`, `eval`, `io`; `calibrate.config` is a plain dataclass at layer 3, read by `SafetyMergeConfig`.
"""

from ..merge.calibration_config import SCALES, CalibrationConfig
from .repair import REPAIR_METHODS, MethodSearch, RepairConfig, RepairResult, repair
from .run import CalibrationResult, calibrate, calibration_prompts, merge_calibrated
from .search import Probe, SearchResult, Target, search_scale

__all__ = [
    "REPAIR_METHODS",
    "SCALES",
    "CalibrationConfig",
    "CalibrationResult",
    "MethodSearch",
    "Probe",
    "RepairConfig",
    "RepairResult",
    "SearchResult",
    "Target",
    "calibrate",
    "calibration_prompts",
    "merge_calibrated",
    "repair",
    "search_scale",
]
