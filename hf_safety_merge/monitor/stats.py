"""The paired test the ``stop`` and ``warn`` policies use: an exact one-sided McNemar test on the
probes whose verdict changed between the start of training and now."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedChange", "mcnemar_exact", "paired_change"]


def mcnemar_exact(worse: int, better: int) -> float:
    """One-sided exact McNemar p-value for "more probes got worse than better".

    ``worse`` = probes safe at the start and unsafe now, ``better`` = the reverse. Under the null
    (no change), each discordant probe is worse with probability 1/2, so
    ``p = P(X >= worse)`` for ``X ~ Binomial(worse + better, 1/2)``; ``1.0`` with no discordant
    probe.
    """
    if worse < 0 or better < 0:
        raise ValueError(f"counts must be >= 0, got worse={worse}, better={better}")
    n = worse + better
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(worse, n + 1))
    return min(1.0, tail / 2.0**n)


@dataclass(frozen=True)
class PairedChange:
    """The change of a per-probe flag between two probe runs on the same probes.

    Attributes:
        n: probes compared; ``worse``/``better``: discordant probes (flag off -> on / on -> off);
        delta: the change of the rate (now - start), a fraction; p_value: :func:`mcnemar_exact`.
    """

    n: int
    worse: int
    better: int
    delta: float
    p_value: float


def paired_change(start: Sequence[bool], now: Sequence[bool]) -> PairedChange:
    """Compare two runs' per-probe flags (same probes, same order)."""
    if len(start) != len(now):
        raise ValueError(f"paired flags differ in length: {len(start)} vs {len(now)}")
    worse = sum(1 for a, b in zip(start, now) if not a and b)
    better = sum(1 for a, b in zip(start, now) if a and not b)
    n = len(start)
    delta = (worse - better) / n if n else 0.0
    return PairedChange(n, worse, better, delta, mcnemar_exact(worse, better))
