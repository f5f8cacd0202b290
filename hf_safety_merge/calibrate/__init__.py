"""Calibrated repair: the smallest merge scale that meets a safety target (`calibration:`)."""

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
