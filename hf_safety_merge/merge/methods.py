"""Compatibility module: the methods now live one per file in `hf_safety_merge.merge`; this old path re-exports them."""

from .enchtable import *  # noqa: F403
from .interference import *  # noqa: F403
from .safe_lora import *  # noqa: F403
from .task_arithmetic import *  # noqa: F403
from .ties_dare import *  # noqa: F403
