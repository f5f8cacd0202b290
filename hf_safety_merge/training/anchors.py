"""Compatibility module: moved to :mod:`hf_safety_merge.training.asft.anchors`; this old path re-exports it."""

from .asft.anchors import *  # noqa: F403
