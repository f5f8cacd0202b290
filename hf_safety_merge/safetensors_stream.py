"""Compatibility module: moved to :mod:`hf_safety_merge.io.safetensors_stream`; this old path re-exports it."""

from .io.safetensors_stream import *  # noqa: F403
