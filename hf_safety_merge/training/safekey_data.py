"""Compatibility module: moved to :mod:`hf_safety_merge.training.safekey.data`; this old path re-exports it."""

from .safekey.data import *  # noqa: F403
