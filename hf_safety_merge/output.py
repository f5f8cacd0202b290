"""Compatibility module: moved to :mod:`hf_safety_merge.io.output`; this old path re-exports it."""

from .io.output import *  # noqa: F403
