"""Hub failures in words: `HubError`, the internal corrupt-file and transient markers, the
endpoint and offline state, and token redaction for every message (docs/hub.md, "Faults").

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import SafetyMergeError


class HubError(SafetyMergeError, RuntimeError):
    """A Hub request failed (with what to retry)."""


class _Corrupt(Exception):
    """A downloaded file's hash differs from the one the Hub records (the copy was removed)."""

    def __init__(self, filename: str, algorithm: str, expected: str, actual: str) -> None:
        super().__init__(f"{filename} does not match the Hub's {algorithm} (expected {expected}, got {actual})")
        self.filename, self.algorithm, self.expected, self.actual = filename, algorithm, expected, actual


class _Transient(Exception):
    """A failure worth another try that is not an HTTP status: a response cut short, a branch
    that moved under a commit."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _redact(msg: str) -> str:
    """Remove anything that looks like a token from a message."""
    from huggingface_hub import get_token

    tok = get_token()
    if tok:
        msg = msg.replace(tok, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", msg)


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _as_local_too(display: str) -> str:
    """For a Hub failure on a name that could also be a mistyped local path: say both readings."""
    ref = display.split("@", 1)[0]
    if "/" in ref and not ref.startswith(("/", ".", "~")):
        return f" ({ref} is not a local path either: no such folder {Path(ref).resolve()})"
    return ""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no answer"
