"""Non-finite values (NaN/Inf) in inputs and outputs: a cheap check, and the guard that refuses
them (or, with `allow_non_finite`, passes them through with a warning)."""

from __future__ import annotations

import warnings

import torch

from ..errors import NonFiniteError


def _is_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite. A sum is finite iff every entry is (barring overflow,
    where the full check decides): one cheap pass instead of an isfinite mask per tensor."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class _FiniteGuard:
    """Refuses non-finite values (NaN/Inf), or with `allow` passes them through with a warning."""

    def __init__(self, allow: bool) -> None:
        self.allow = allow
        self.passed: list[str] = []

    def fail(self, msg: str) -> None:
        if not self.allow:
            raise NonFiniteError(f"{msg}; nothing was written (set allow_non_finite: true to pass such values through)")
        if msg not in self.passed:
            self.passed.append(msg)
            warnings.warn(f"{msg}; passed through (allow_non_finite)", stacklevel=3)

    def culprit(self, name: str, checks: list[tuple[torch.Tensor | None, str]]) -> str:
        for t, where in checks:
            if t is not None and not _is_finite(t):
                return f"{where} holds NaN/Inf values"
        return ""
