"""What `repair` found: one method's scale search (`MethodSearch`) and the whole search with its
choice and held-out check (`RepairResult`: the headline, the table, `repair.json`'s content).

Layer 5 (docs/architecture.md): the search that fills them is :mod:`.repair`, the card that shows
them :mod:`.repair_card`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..merge.calibration_config import CalibrationConfig
from .repair_config import RepairConfig, label
from .run import _fmt
from .search import Probe, SearchResult


@dataclass
class MethodSearch:
    """One method's (and vector's) scale search."""

    method: str
    vector: str
    parameter: str
    search: SearchResult
    final_method: Any = None

    @property
    def label(self) -> str:
        name = label(self.method)
        return f"{name} ({Path(self.vector).name})" if self.method == "enchtable" else name

    def to_dict(self) -> dict[str, Any]:
        s = self.search
        return {"method": self.method, "vector": self.vector, "parameter": self.parameter, "chosen": s.chosen.scale,
                "met": s.met, "feasible": s.feasible, "misses": s.misses, "strategy": s.strategy,
                "message": s.message(self.parameter), "probes": [p.to_dict() for p in s.probes]}


@dataclass
class RepairResult:
    """The whole search, the choice and the held-out check."""

    config: RepairConfig
    searches: list[MethodSearch]
    baseline: Probe
    chosen: MethodSearch | None
    prompts: dict[str, dict[str, Any]]
    check: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output_dir: Path | None = None

    @property
    def cal(self) -> CalibrationConfig:
        assert isinstance(self.config.calibration, CalibrationConfig)
        return self.config.calibration

    def headline(self) -> str:
        """One line: what to ship and what it does on the calibration (and held-out) prompts."""
        if self.chosen is None:
            return "no repair keeps the constraints: ship nothing from this search (see the curves)"
        c, b = self.chosen.search.chosen, self.baseline
        line = (f"ship {self.chosen.label}, {self.chosen.parameter} = {c.scale:.4g}: unsafe {100 * b.unsafe.value:.0f}% -> "
                f"{100 * c.unsafe.value:.0f}%")
        if c.over_refusal is not None and b.over_refusal is not None:
            line += f", over-refusal {100 * (c.over_refusal.value - b.over_refusal.value):+.0f} pts"
        if c.utility is not None and b.utility is not None:
            line += f", task {100 * (c.utility.value - b.utility.value):+.0f} pts"
        line += " (calibration prompts)"
        if self.check:
            t, r = self.check.get("task model", {}), self.check.get("repaired", {})
            if t and r:
                line += f"; held out: unsafe {100 * t['unsafe']['value']:.0f}% -> {100 * r['unsafe']['value']:.0f}%"
        return line

    def to_dict(self) -> dict[str, Any]:
        t = self.cal
        return {"format": "hf-safety-merge/repair", "version": 1, "headline": self.headline(),
                "chosen": None if self.chosen is None else {"method": self.chosen.method, "vector": self.chosen.vector,
                                                           "parameter": self.chosen.parameter,
                                                           "value": self.chosen.search.chosen.scale,
                                                           "met": self.chosen.search.met},
                "target": dataclasses.asdict(t.target()), "baseline": self.baseline.to_dict(),
                "searches": [s.to_dict() for s in self.searches], "prompts": self.prompts, "check": self.check,
                "judge": t.judge, "seconds": self.seconds, "notes": self.notes}

    def table(self) -> str:
        """The choice per method: one row each, with the task model first."""
        b = self.baseline
        lines = ["| method | scale | unsafe | over-refusal | utility | outcome |", "| --- | --- | --- | --- | --- | --- |",
                 f"| task model (unpatched) | - | {_fmt(b.unsafe)} | {_fmt(b.over_refusal)} | {_fmt(b.utility)} | |"]
        for s in self.searches:
            c = s.search.chosen
            what = "meets the target" if s.search.met else ("best within the constraints" if s.search.feasible
                                                             else "breaks a constraint")
            mark = " **chosen**" if s is self.chosen else ""
            lines.append(f"| {s.label} | {s.parameter} = {c.scale:.4g} | {_fmt(c.unsafe)} | {_fmt(c.over_refusal)} | "
                         f"{_fmt(c.utility)} | {what}{mark} |")
        return "\n".join(lines)
