"""Calibrated repair: the smallest merge scale that meets a safety target (`calibration:`).

Layer 6 (docs/architecture.md): may import the merge engine, `vectors`, `config`, `eval`, `io`; `calibrate.config` is a plain dataclass at layer 3, read by `SafetyMergeConfig`.
"""

from .config import SCALES, CalibrationConfig
from .run import CalibrationResult, calibrate, calibration_prompts, merge_calibrated
from .search import Probe, SearchResult, Target, search_scale

__all__ = [
    "SCALES",
    "CalibrationConfig",
    "CalibrationResult",
    "Probe",
    "SearchResult",
    "Target",
    "calibrate",
    "calibration_prompts",
    "merge_calibrated",
    "search_scale",
]
