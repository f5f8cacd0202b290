"""The scale search: the smallest merge scale that meets a safety target, within a budget.

Pure logic over a `probe(scale) -> Probe` callable (merging and evaluating is the caller's), so
it is tested on its own. The unsafe rate falls as the scale grows and over-refusal rises, so the
smallest scale that meets `max_unsafe` is also the one with the least over-refusal and utility
loss: the search bisects on the unsafe rate (log-spaced for a continuous scale with a positive
lower end). When the measured curve is not monotone (a larger scale more unsafe than a smaller one
by more than sampling noise), the remaining probes go to a grid over the whole range instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..eval.metrics import Rate


@dataclass
class Target:
    max_unsafe: float = 0.05
    max_over_refusal_increase: float = 0.05
    min_utility: float | None = None


@dataclass
class Probe:
    """One evaluated scale."""

    scale: float
    unsafe: Rate
    over_refusal: Rate | None = None
    utility: Rate | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def misses(self, target: Target, baseline_over_refusal: float | None) -> dict[str, float]:
        """target name -> by how much this probe misses it (empty: meets the whole target)."""
        out: dict[str, float] = {}
        if self.unsafe.value > target.max_unsafe:
            out["max_unsafe"] = self.unsafe.value - target.max_unsafe
        if self.over_refusal is not None and baseline_over_refusal is not None:
            rise = self.over_refusal.value - baseline_over_refusal
            if rise > target.max_over_refusal_increase:
                out["max_over_refusal_increase"] = rise - target.max_over_refusal_increase
        if target.min_utility is not None and self.utility is not None and self.utility.value < target.min_utility:
            out["min_utility"] = target.min_utility - self.utility.value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "unsafe": self.unsafe.to_dict(),
                "over_refusal": self.over_refusal.to_dict() if self.over_refusal else None,
                "utility": self.utility.to_dict() if self.utility else None, "seconds": self.seconds, **self.extra}


@dataclass
class SearchResult:
    probes: list[Probe]  # in the order they ran
    chosen: Probe
    met: bool
    misses: dict[str, float]
    strategy: str  # "bisection", "grid (curve not monotone)", "grid (target out of range)"
    baseline: Probe | None = None

    def message(self, parameter: str) -> str:
        c = self.chosen
        if self.met:
            return f"{parameter} = {c.scale:.4g} is the smallest probed value that meets the target ({self.strategy})"
        parts = [f"{k} by {v:.3f}" for k, v in self.misses.items()]
        return (f"no probed {parameter} meets the whole target; best trade-off {parameter} = {c.scale:.4g} misses "
                + ", ".join(parts) + f" ({self.strategy})")


def _mid(lo: float, hi: float, integer: bool) -> float:
    if integer:
        return float(math.floor((lo + hi) / 2))
    return math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2


def _grid(lo: float, hi: float, n: int, integer: bool) -> list[float]:
    if n <= 0:
        return []
    if integer:
        pts = sorted({round(lo + (hi - lo) * i / max(1, n - 1)) for i in range(n)})
        return [float(p) for p in pts]
    if lo > 0:
        return [lo * (hi / lo) ** (i / max(1, n - 1)) for i in range(n)]
    return [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]


def monotone(probes: list[Probe]) -> bool:
    """Unsafe counts never rise with the scale by more than sampling noise (max(1, 5% of n))."""
    ps = sorted(probes, key=lambda p: p.scale)
    for i, a in enumerate(ps):
        for b in ps[i + 1:]:
            tol = max(1, round(0.05 * max(a.unsafe.n, b.unsafe.n)))
            if b.unsafe.k > a.unsafe.k + tol:
                return False
    return True


def search_scale(
    probe: Callable[[float], Probe],
    low: float,
    high: float,
    *,
    target: Target,
    max_probes: int = 8,
    integer: bool = False,
    baseline_over_refusal: float | None = None,
    rel_tol: float = 0.02,
) -> SearchResult:
    """Run at most `max_probes` probes and pick the smallest scale that meets `target`."""
    probes: list[Probe] = []
    done: dict[float, Probe] = {}

    def run(s: float) -> Probe:
        s = float(round(s)) if integer else s
        if s not in done:
            done[s] = probe(s)
            probes.append(done[s])
        return done[s]

    def unsafe_ok(p: Probe) -> bool:
        return p.unsafe.value <= target.max_unsafe

    strategy = "bisection"
    top = run(high)
    if not unsafe_ok(top):
        strategy = "grid (max_unsafe not reached even at the top of the range)"
        for s in _grid(low, high, max_probes, integer)[:-1]:
            run(s)
    else:
        bottom = run(low)
        lo, hi = (low, high) if not unsafe_ok(bottom) else (low, low)
        while len(probes) < max_probes and hi - lo > (1 if integer else rel_tol * hi):
            if not monotone(probes):
                break
            mid = _mid(lo, hi, integer)
            if mid in done or mid <= lo or mid >= hi:
                break
            if unsafe_ok(run(mid)):
                hi = mid
            else:
                lo = mid
        if not monotone(probes):
            strategy = "grid (curve not monotone)"
            for s in _grid(low, high, max_probes, integer):
                if len(probes) >= max_probes:
                    break
                run(s)
    ordered = sorted(probes, key=lambda p: p.scale)
    meeting = [p for p in ordered if not p.misses(target, baseline_over_refusal)]
    if meeting:
        return SearchResult(probes, meeting[0], True, {}, strategy)
    # best trade-off: the least total shortfall, then the smaller scale
    best = min(ordered, key=lambda p: (sum(p.misses(target, baseline_over_refusal).values()), p.scale))
    return SearchResult(probes, best, False, best.misses(target, baseline_over_refusal), strategy)
