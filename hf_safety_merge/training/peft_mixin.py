"""Compatibility module: moved to :mod:`hf_safety_merge.training.asft.peft_mixin`; this old path re-exports it."""

from .asft.peft_mixin import *  # noqa: F403
