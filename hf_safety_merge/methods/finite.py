"""Cheap whole-tensor reductions: non-finite values (NaN/Inf) in inputs and outputs (a check, and
the guard that refuses them or, with `allow_non_finite`, passes them through with a warning), and
the float64 sum of squares behind every norm the library reports or scales by."""

from __future__ import annotations

import warnings

import torch

from ..errors import NonFiniteError


def is_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite. A sum is finite iff every entry is (barring overflow,
    where the full check decides): one cheap pass instead of an isfinite mask per tensor."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


#: elements per chunk of `sq_sum`: a 512 KiB float64 buffer that stays in cache
SQ_SUM_CHUNK = 1 << 16


def sq_sum(t: torch.Tensor) -> float:
    """The sum of squares of `t` in float64, `float(t.double().pow(2).sum())` up to the order of
    the float64 additions (tested to 1e-12 relative), taken a chunk at a time through one small
    float64 buffer: no float64 copy of the tensor (for a 513 MiB checkpoint that copy was 1 GiB of
    fresh pages per pass, and ~2x the time)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= SQ_SUM_CHUNK or flat.device.type != "cpu":  # on a GPU, one kernel (no sync per chunk)
        d = flat.to(torch.float64, copy=True)
        return float(d.mul_(d).sum())
    buf = torch.empty(SQ_SUM_CHUNK, dtype=torch.float64, device=t.device)
    total = 0.0
    for i in range(0, n, SQ_SUM_CHUNK):
        chunk = flat[i : i + SQ_SUM_CHUNK]
        b = buf[: chunk.numel()]
        b.copy_(chunk)
        total += float(b.mul_(b).sum())
    return total


class FiniteGuard:
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
            if t is not None and not is_finite(t):
                return f"{where} holds NaN/Inf values"
        return ""
