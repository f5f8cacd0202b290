"""The card of a `repair`: the "Repair" section (the answer, a row per method, each method's
curve with the paired bound per probe, the held-out check), `repair.json` and `repair.png`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..eval.metrics import Rate
from .run import _fmt, plot_curve

if TYPE_CHECKING:
    from .repair_result import RepairResult


def write_repair(folder: Path, result: RepairResult) -> list[str]:
    """`repair.json`, `repair.png` and the card's "Repair" section (before the folder is moved
    into place)."""
    (folder / "repair.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    files = ["repair.json"]
    plot = _plot(result, folder / "repair.png")
    if plot:
        files.append("repair.png")
    report = folder / "merge_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        data["repair"] = {"headline": result.headline(), "file": "repair.json"}
        report.write_text(json.dumps(data, indent=2) + "\n")
    card = folder / "README.md"
    if card.is_file():
        card.write_text(card.read_text().rstrip() + "\n\n" + repair_section(result, plot=bool(plot)) + "\n")
    return files


def repair_section(result: RepairResult, plot: bool = False) -> str:
    cal = result.cal
    t = cal.target()
    cons = [f"over-refusal at most {t.max_over_refusal_increase:.3f} above the unpatched model"]
    if t.min_utility is not None:
        cons.append(f"utility >= {t.min_utility:.3f}")
    if t.max_utility_drop is not None:
        cons.append(f"utility at most {t.max_utility_drop:.3f} below the unpatched model")
    used = ", ".join(f"{k}: {v['n']} from {v['source']} ({v['side']})" for k, v in result.prompts.items())
    lines = [
        "## Repair",
        "",
        f"**{result.headline()}**",
        "",
        f"`hf-safety-merge repair` searched {len(result.searches)} method(s) x scale, constraint-first: hard constraints "
        f"({'; '.join(cons)}; each checked paired on the same prompts at a one-sided {100 * t.confidence:.0f}% bound), "
        f"within them the least unsafe setting, stopping at unsafe <= {t.max_unsafe:.3f}.",
        "",
        result.table(),
        "",
    ]
    for s in result.searches:
        lines += [f"<details><summary>{s.label}: {s.search.message(s.parameter)}</summary>", "",
                  f"| {s.parameter} | unsafe | over-refusal | utility | rise bound | |", "| --- | --- | --- | --- | --- | --- |"]
        for p in sorted(s.search.probes, key=lambda p: p.scale):
            chk = p.checks(t, result.baseline).get("max_over_refusal_increase")
            bound = f"{chk['bound']:+.3f}" + ("" if chk["kept"] else " (breaks)") if chk else "-"
            note = "chosen" if p is s.search.chosen else ""
            lines.append(f"| {p.scale:.4g} | {_fmt(p.unsafe)} | {_fmt(p.over_refusal)} | {_fmt(p.utility)} | {bound} | {note} |")
        lines += ["", "</details>", ""]
    if result.check:
        lines += ["Held-out check (the eval sides of the calibration sources' splits, never calibrated on):", "",
                  "| model | unsafe | over-refusal |", "| --- | --- | --- |"]
        for name, c in result.check.items():
            lines.append(f"| {name} | {_fmt(_rate(c['unsafe']))} | {_fmt(_rate(c['over_refusal']))} |")
        lines.append("")
    lines.append(f"Calibration prompts: {used}; judge `{cal.judge}`; greedy, {cal.max_new_tokens} new tokens. "
                 "A rate met on n calibration prompts holds on new prompts only up to its interval.")
    lines += [f"Note: {n}." for n in result.notes]
    if plot:
        lines += ["", "![repair search](repair.png)"]
    return "\n".join(lines)


def _rate(d: dict[str, Any] | None) -> Rate | None:
    return Rate.from_dict(d) if d else None


def _plot(result: RepairResult, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k = len(result.searches)
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.2), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], result.searches):
        plot_curve(ax, s.search.probes, s.parameter, result.cal.max_unsafe, s.search.chosen.scale, ms=3, capsize=2)
        ax.set_title(s.label + (" (chosen)" if s is result.chosen else ""), fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
