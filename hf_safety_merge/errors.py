"""Exceptions raised by hf-safety-merge.

Every error names the file, tensor or field at fault and what was expected, so that a user can
fix the input without reading a traceback.

Layer 0 (docs/architecture.md): imports nothing from the package.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SafetyMergeError(Exception):
    """Base class of all errors raised by this library."""


class ConfigError(SafetyMergeError, ValueError):
    """A configuration file or object is invalid (unknown key, bad value, missing field)."""


class CheckpointError(SafetyMergeError, ValueError):
    """A checkpoint, adapter or safety vector cannot be read or does not match the plan."""


class PlanError(SafetyMergeError, ValueError):
    """The inputs of a merge are inconsistent (shapes, names, architecture, vocabulary)."""


class NonFiniteError(SafetyMergeError, ValueError):
    """A tensor holds NaN or Inf values."""


class DiskSpaceError(SafetyMergeError, OSError):
    """A folder lacks the free space a write needs (checked before writing), or filled during it."""


class OutputBusyError(SafetyMergeError, RuntimeError):
    """Another process is writing the same output folder (its lock is held)."""


class CalibrationError(SafetyMergeError, RuntimeError):
    """Calibration found no setting that keeps the hard constraints (over-refusal, utility)."""


class IntegrityError(SafetyMergeError, ValueError):
    """A file's sha256 differs from the one recorded for it (`--verify`): it changed on disk."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """Return a `" (did you mean 'x'?)"` hint, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
