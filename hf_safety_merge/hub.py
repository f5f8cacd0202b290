"""Compatibility module: moved to :mod:`hf_safety_merge.io.hub`; this old path re-exports it."""

from .io.hub import *  # noqa: F403
