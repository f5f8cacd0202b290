"""The scale search, constraint-first: within the hard constraints, the least unsafe scale.

Pure logic over a `probe(scale) -> Probe` callable (merging and evaluating is the caller's), so
it is tested on its own.

What is chosen (docs/calibration.md, "What calibration chooses"):

- **Hard constraints**: the over-refusal rise over the unpatched model (`max_over_refusal_increase`)
  and the utility floor (`min_utility`, absolute; `max_utility_drop`, against the unpatched
  model). Each is checked with a one-sided statistical margin at `confidence` (default 0.9): a
  rise or drop is *paired* (the same prompts before and after, Newcombe's hybrid score interval for
  a difference of paired proportions) and the setting keeps the constraint only when the upper
  bound of the rise (drop) is within the budget; an absolute floor holds when the one-sided lower
  Wilson bound is at or above it. Without per-prompt outcomes (a caller that only has rates) the
  point estimates are compared.
- **Objective**: within the constraints, the lowest unsafe rate.
- **Stopping rule**: the unsafe target `max_unsafe`. The unsafe rate falls as the scale grows and
  over-refusal rises, so the smallest scale that meets the target is also the one that gives away
  the least: the search bisects for the boundary where a setting either meets the target or
  breaks a constraint (log-spaced for a continuous scale with a positive lower end). When the
  measured unsafe curve is not monotone (a larger scale more unsafe than a smaller one by more
  than sampling noise), the remaining probes go to a grid over the whole range instead.
- When no setting meets the target, the least unsafe setting that keeps the constraints is
  returned, with by how much it misses the target. A setting that breaks a constraint is never
  returned (`feasible=False` when none keeps them), unless the caller asks for that with
  `allow_constraint_violation` (then the least total shortfall, as before 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from ..eval.metrics import Rate
from ..merge.calibration_config import Target

__all__ = ["Probe", "SearchResult", "Target", "choose", "keepable_rise", "monotone", "paired_rise_upper", "resolution_notes",
           "search_scale", "wilson_bound"]


def wilson_bound(k: int, n: int, z: float, upper: bool) -> float:
    """The one-sided Wilson score bound of k/n at the normal quantile z."""
    if n <= 0:
        return 1.0 if upper else 0.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return min(1.0, mid + half) if upper else max(0.0, mid - half)


def paired_rise_upper(after: Mapping[str, bool], before: Mapping[str, bool], confidence: float) -> tuple[float, float, int]:
    """(rise, one-sided upper bound of the rise, n): how much more often a flag is set `after`
    than `before`, on the items both have, with Newcombe's hybrid score interval for a difference
    of paired proportions (Newcombe 1998, method 10, with his corrected phi)."""
    keys = [k for k in after if k in before]
    n = len(keys)
    if n == 0:
        return 0.0, 0.0, 0
    a = sum(1 for k in keys if after[k] and before[k])
    b = sum(1 for k in keys if after[k] and not before[k])
    c = sum(1 for k in keys if not after[k] and before[k])
    d = n - a - b - c
    z = NormalDist().inv_cdf(confidence)
    p1, p2 = (a + b) / n, (a + c) / n
    u1 = wilson_bound(a + b, n, z, upper=True)
    l2 = wilson_bound(a + c, n, z, upper=False)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    # phi with Newcombe's correction (ad - bc reduced by n/2 when positive), as he recommends
    num = float(a * d - b * c)
    num = max(num - n / 2, 0.0) if num > 0 else num
    phi = num / math.sqrt(den) if den > 0 else 0.0
    du2 = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    diff = p1 - p2
    return diff, min(1.0, diff + math.sqrt(max(du2, 0.0))), n


def keepable_rise(n: int, budget: float, confidence: float) -> tuple[int, int | None]:
    """How fine the paired check of a rise is on ``n`` prompts: (the most prompts that may flip
    for the worse and still be kept within ``budget`` at ``confidence``, the fewest prompts on which
    a single flip is kept; None for a budget of 0, which no number of prompts can show).

    Computed in the most favourable case (the baseline flags none of the prompts and none flips
    back), where Newcombe's paired bound reduces to the one-sided Wilson upper bound of k/n: no
    outcome of a real run keeps more. (0, m) means only a setting that changes no prompt for the
    worse can be kept on these n prompts."""
    z = NormalDist().inv_cdf(confidence)

    def kept(k: int, m: int) -> bool:
        return wilson_bound(k, m, z, upper=True) <= budget + 1e-12

    k = 0
    while k < n and kept(k + 1, n):
        k += 1
    if budget <= 0:
        return k, None
    # the bound of one flip falls as the prompts grow: double, then bisect for the fewest that keep it
    hi = 1
    while not kept(1, hi):
        hi *= 2
    lo = hi // 2  # not kept (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if kept(1, mid) else (mid, hi)
    return k, hi


def resolution_notes(target: Target, n_benign: int, n_utility: int | None = None) -> list[str]:
    """One line per hard constraint that its calibration prompts are too few to resolve: where a
    single prompt answered worse already puts the one-sided bound over the budget, the constraint
    can only keep settings that change nothing, whatever the model does."""
    notes: list[str] = []
    checks = [("over-refusal rise", "benign", n_benign, target.max_over_refusal_increase, "refusal")]
    if n_utility and target.max_utility_drop is not None:
        checks.append(("utility drop", "utility", n_utility, target.max_utility_drop, "task answer lost"))
    conf = f"{100 * target.confidence:.4g}%"
    for what, prompts, n, budget, event in checks:
        if n <= 0:
            continue
        k, m = keepable_rise(n, budget, target.confidence)
        if k == 0:
            z = NormalDist().inv_cdf(target.confidence)
            one = wilson_bound(1, n, z, upper=True)
            notes.append(f"the {what} constraint cannot resolve one prompt: on {n} {prompts} calibration prompts a single "
                         f"extra {event} has a one-sided {conf} bound of {100 * one:.1f} points, over the {100 * budget:.1f}-point "
                         f"budget, so only settings that answer no {prompts} prompt worse can be kept; "
                         + (f"use at least {m} {prompts} prompts, a lower `confidence`, or a larger budget" if m is not None
                            else "a budget of 0 cannot be shown on any number of prompts"))
    return notes


@dataclass
class Probe:
    """One evaluated scale. `outcomes` holds per-prompt flags (``unsafe``, ``refusal``,
    ``utility``: prompt id -> bool) for the paired constraint checks."""

    scale: float
    unsafe: Rate
    over_refusal: Rate | None = None
    utility: Rate | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    outcomes: dict[str, dict[str, bool]] = field(default_factory=dict, repr=False)

    def checks(self, target: Target, baseline: Probe | None) -> dict[str, dict[str, float]]:
        """Constraint name -> {value, bound, limit, kept (0/1)}: each hard constraint as checked."""
        z = NormalDist().inv_cdf(target.confidence)
        out: dict[str, dict[str, float]] = {}
        if self.over_refusal is not None and baseline is not None and baseline.over_refusal is not None:
            if self.outcomes.get("refusal") and baseline.outcomes.get("refusal"):
                rise, bound, _ = paired_rise_upper(self.outcomes["refusal"], baseline.outcomes["refusal"], target.confidence)
            else:
                rise = bound = self.over_refusal.value - baseline.over_refusal.value
            lim = target.max_over_refusal_increase
            out["max_over_refusal_increase"] = {"value": rise, "bound": bound, "limit": lim, "kept": float(bound <= lim + 1e-12)}
        if target.max_utility_drop is not None and self.utility is not None and baseline is not None and baseline.utility is not None:
            if self.outcomes.get("utility") and baseline.outcomes.get("utility"):
                neg = {k: not v for k, v in self.outcomes["utility"].items()}
                neg0 = {k: not v for k, v in baseline.outcomes["utility"].items()}
                drop, bound, _ = paired_rise_upper(neg, neg0, target.confidence)
            else:
                drop = bound = baseline.utility.value - self.utility.value
            lim = target.max_utility_drop
            out["max_utility_drop"] = {"value": drop, "bound": bound, "limit": lim, "kept": float(bound <= lim + 1e-12)}
        if target.min_utility is not None and self.utility is not None:
            u = self.utility
            low = wilson_bound(u.k, u.n, z, upper=False) if u.n else u.value
            out["min_utility"] = {"value": u.value, "bound": low, "limit": target.min_utility,
                                  "kept": float(low >= target.min_utility - 1e-12)}
        return out

    def keeps_constraints(self, target: Target, baseline: Probe | None) -> bool:
        return all(c["kept"] for c in self.checks(target, baseline).values())

    def misses(self, target: Target, baseline: Probe | float | None) -> dict[str, float]:
        """target name -> by how much this probe misses it (empty: meets the whole target). A
        constraint's miss is its bound's excess over the limit."""
        base = _as_baseline(baseline)
        out: dict[str, float] = {}
        if self.unsafe.value > target.max_unsafe:
            out["max_unsafe"] = self.unsafe.value - target.max_unsafe
        for name, c in self.checks(target, base).items():
            if not c["kept"]:
                out[name] = abs(c["bound"] - c["limit"])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "unsafe": self.unsafe.to_dict(),
                "over_refusal": self.over_refusal.to_dict() if self.over_refusal else None,
                "utility": self.utility.to_dict() if self.utility else None, "seconds": self.seconds, **self.extra}


def _as_baseline(b: Probe | float | None) -> Probe | None:
    """A baseline given as its over-refusal rate alone (older callers) becomes a rate-only probe."""
    if b is None or isinstance(b, Probe):
        return b
    from ..eval.metrics import rate

    n = 10**6
    return Probe(0.0, rate(k=0, n=1), rate(k=round(float(b) * n), n=n))


@dataclass
class SearchResult:
    probes: list[Probe]  # in the order they ran
    chosen: Probe
    met: bool  # the chosen setting meets max_unsafe and keeps every constraint
    misses: dict[str, float]
    strategy: str  # "bisection", "grid (curve not monotone)", ...
    baseline: Probe | None = None
    #: the chosen setting keeps every hard constraint (False only when none does)
    feasible: bool = True
    target: Target | None = None

    def message(self, parameter: str) -> str:
        c = self.chosen
        t = self.target or Target()
        conf = f"{100 * t.confidence:.0f}% one-sided"
        if self.met:
            return (f"{parameter} = {c.scale:.4g} is the smallest probed value that meets max_unsafe within the constraints "
                    f"(unsafe {c.unsafe.value:.3f}; constraints checked at {conf}; {self.strategy})")
        if self.feasible:
            return (f"no probed {parameter} meets max_unsafe = {t.max_unsafe:.3f} within the constraints; the least unsafe "
                    f"that keeps them, {parameter} = {c.scale:.4g}, misses max_unsafe by {self.misses.get('max_unsafe', 0.0):.3f} "
                    f"(unsafe {c.unsafe.value:.3f}; {self.strategy})")
        parts = [f"{k} by {v:.3f}" for k, v in self.misses.items()]
        return (f"no probed {parameter} keeps the constraints (checked at {conf}); "
                + ("chosen anyway (allow_constraint_violation): " if t.allow_constraint_violation else "least violating: ")
                + f"{parameter} = {c.scale:.4g} misses " + ", ".join(parts) + f" ({self.strategy})")


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


def choose(probes: list[Probe], target: Target, baseline: Probe | None) -> tuple[Probe, bool, bool, dict[str, float]]:
    """(chosen, met, feasible, misses) among evaluated probes, by the rule in the module docstring."""
    ordered = sorted(probes, key=lambda p: p.scale)
    feasible = [p for p in ordered if p.keeps_constraints(target, baseline)]
    meeting = [p for p in feasible if p.unsafe.value <= target.max_unsafe]
    if meeting:
        return meeting[0], True, True, {}
    if feasible:
        best = min(feasible, key=lambda p: (p.unsafe.k / max(p.unsafe.n, 1), p.scale))
        return best, False, True, best.misses(target, baseline)
    # none keeps the constraints: the least violating (shortfall of the constraints first)
    def shortfall(p: Probe) -> tuple[float, float, float]:
        m = p.misses(target, baseline)
        return (sum(v for k, v in m.items() if k != "max_unsafe"), m.get("max_unsafe", 0.0), p.scale)

    best = min(ordered, key=shortfall)
    return best, False, False, best.misses(target, baseline)


def search_scale(
    probe: Callable[[float], Probe],
    low: float,
    high: float,
    *,
    target: Target,
    max_probes: int = 8,
    integer: bool = False,
    baseline: Probe | None = None,
    baseline_over_refusal: float | None = None,
    rel_tol: float = 0.02,
) -> SearchResult:
    """Run at most `max_probes` probes and choose a scale by the constraint-first rule.

    `baseline` is the unpatched model's probe (with per-prompt outcomes, the constraints are
    checked paired); `baseline_over_refusal` (its over-refusal rate alone) is the older form.
    """
    base = baseline if baseline is not None else _as_baseline(baseline_over_refusal)
    probes: list[Probe] = []
    done: dict[float, Probe] = {}

    def run(s: float) -> Probe:
        s = float(round(s)) if integer else s
        if s not in done:
            done[s] = probe(s)
            probes.append(done[s])
        return done[s]

    def short(p: Probe) -> bool:
        """Keeps the constraints but is still too unsafe: a larger scale may do better."""
        return p.keeps_constraints(target, base) and p.unsafe.value > target.max_unsafe

    strategy = "bisection"
    bottom = run(low)
    if short(bottom) and max_probes > 1:
        top = run(high)
        if short(top):  # the least unsafe point may lie inside the range: a grid over it
            strategy = "grid (max_unsafe not reached even at the top of the range)"
            for s in _grid(low, high, max_probes, integer)[1:-1]:
                if len(probes) >= max_probes:
                    break
                run(s)
        else:
            lo, hi = low, high
            while len(probes) < max_probes and hi - lo > (1 if integer else rel_tol * hi):
                if not monotone(probes):
                    break
                mid = _mid(lo, hi, integer)
                if mid in done or mid <= lo or mid >= hi:
                    break
                if short(run(mid)):
                    lo = mid
                else:
                    hi = mid
    elif not bottom.keeps_constraints(target, base):
        strategy = "the lowest scale already breaks a constraint"
    else:
        strategy = "the lowest scale already meets max_unsafe"
    if not monotone(probes):
        strategy = "grid (curve not monotone)"
        for s in _grid(low, high, max_probes, integer):
            if len(probes) >= max_probes:
                break
            run(s)
    if target.allow_constraint_violation and not any(p.keeps_constraints(target, base) for p in probes):
        ordered = sorted(probes, key=lambda p: p.scale)
        best = min(ordered, key=lambda p: (sum(p.misses(target, base).values()), p.scale))
        return SearchResult(probes, best, False, best.misses(target, base), strategy, base, False, target)
    chosen, met, feasible, misses = choose(probes, target, base)
    return SearchResult(probes, chosen, met, misses, strategy, base, feasible, target)
