"""Compatibility module: moved to :mod:`hf_safety_merge.io.filters`; this old path re-exports it."""

from .io.filters import *  # noqa: F403
