"""Calibrated repair: a merge's scale chosen constraint-first (`calibration:`), and `repair`, the search
across methods x scales that writes the repair to ship.

Layer 5 (docs/architecture.md): may import the merge engine and its config (`merge`), `methods`, `vectors`, `eval`, `io`; its
settings (`CalibrationConfig`) live in `merge.calibration_config`, read by `SafetyMergeConfig`.
"""

from ..merge.calibration_config import CalibrationConfig, scales
from .repair import repair
from .repair_config import RepairConfig, repair_methods
from .repair_result import MethodSearch, RepairResult
from .run import CalibrationResult, calibrate, calibration_prompts, merge_calibrated
from .search import Probe, SearchResult, Target, search_scale

__all__ = [
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
    "repair_methods",
    "scales",
    "search_scale",
]
