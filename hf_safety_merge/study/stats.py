"""Statistics of the study: Wilson intervals (from `eval.metrics`), the exact McNemar test on
paired per-prompt outcomes, and the Pareto front of (unsafe rate, task score)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..eval.metrics import Rate, rate


def rate_of(flags: Mapping[str, bool] | None) -> Rate | None:
    return None if not flags else rate(flags.values())


def mcnemar(a: Mapping[str, bool], b: Mapping[str, bool]) -> dict[str, Any]:
    """Exact two-sided McNemar test of paired binary outcomes on the prompts both have.

    ``b01``: prompts where `a` is False and `b` True; ``b10`` the reverse. Under the null (the two
    models have the same rate) the discordant pairs split 1:1, so
    ``p = min(1, 2 * P[Binomial(b01 + b10, 1/2) <= min(b01, b10)])``. ``diff`` is
    ``rate(b) - rate(a)`` on the common prompts.
    """
    keys = sorted(set(a) & set(b))
    n = len(keys)
    b01 = sum(1 for k in keys if not a[k] and b[k])
    b10 = sum(1 for k in keys if a[k] and not b[k])
    m = b01 + b10
    if m == 0:
        p = 1.0
    else:
        lo = min(b01, b10)
        p = min(1.0, 2 * sum(math.comb(m, i) for i in range(lo + 1)) / 2**m)
    diff = (sum(b[k] for k in keys) - sum(a[k] for k in keys)) / n if n else float("nan")
    return {"n": n, "b01": b01, "b10": b10, "p": p, "diff": diff}


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the points ``(name, unsafe, task)`` that no other point beats on both (lower
    unsafe rate and higher task score, at least one strictly)."""
    front = []
    for name, u, t in points:
        if not any((u2 <= u and t2 >= t) and (u2 < u or t2 > t) for _, u2, t2 in points):
            front.append(name)
    return front


def fmt_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_rate(r: Rate | Mapping[str, Any] | None) -> str:
    """``12.0% [7.1, 19.5]``: the rate in percent with its Wilson 95% interval."""
    if r is None:
        return "n/a"
    d = r.to_dict() if isinstance(r, Rate) else r
    if not d.get("n"):
        return "n/a"
    return f"{100 * d['value']:.1f}% [{100 * d['low']:.1f}, {100 * d['high']:.1f}]"
