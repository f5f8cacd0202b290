"""Compatibility module: moved to :mod:`hf_safety_merge.io.checkpoints`; this old path re-exports it."""

from .io.checkpoints import *  # noqa: F403
from .io.hub import open_checkpoint  # noqa: F401
