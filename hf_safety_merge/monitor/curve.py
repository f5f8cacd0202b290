"""The monitor's curve: points read back from its JSON file or from a run's logs
(``trainer_state.json`` ``log_history``), a text table, a model-card section and a plot."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "CARD_BEGIN",
    "CARD_END",
    "LOG_PREFIX",
    "card_section",
    "curve_table",
    "plot_curves",
    "read_curve",
    "update_card",
]

#: prefix of every metric the monitor logs through the trainer (TensorBoard / W&B / trackio tags)
LOG_PREFIX = "safety/"
CARD_BEGIN = "<!-- hf-safety-merge:safety-monitor -->"
CARD_END = "<!-- /hf-safety-merge:safety-monitor -->"


def _pct(r: Mapping[str, Any] | None, ci: bool = True) -> str:
    if not r or not r.get("n"):
        return "-"
    s = f"{100 * r['value']:.1f}"
    return f"{s} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]" if ci else s


def curve_table(points: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """The curve as a table: step, unsafe rate [95% Wilson CI], change vs the start with the paired
    p-value, over-refusal, task score, seconds spent probing."""
    head = ["step", "unsafe % [95% CI]", "vs start (points, p)", "over-refusal %", "task %", "probe s"]
    rows = []
    for p in points:
        d = p.get("delta_points")
        vs = "-" if d is None else f"{d:+.1f} (p={p['p_value']:.3g}){' !' if p.get('eroded') else ''}"
        rows.append([f"{p['step']}{' (start)' if p.get('label') == 'start' else ' (end)' if p.get('label') == 'end' else ''}",
                     _pct(p.get("unsafe")), vs, _pct(p.get("over_refusal")), _pct(p.get("task")), f"{p.get('seconds', 0):.1f}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def card_section(points: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None) -> str:
    """The "Safety during training" model-card section (between markers, so it is replaced, not
    duplicated, when the card is written again)."""
    meta = dict(meta or {})
    probes = meta.get("probes", {})
    judge = meta.get("judge", "?")
    lines = [CARD_BEGIN, "## Safety during training", "",
             f"Measured while training by `hf_safety_merge.monitor.SafetyMonitorCallback` on a fixed probe set "
             f"({probes.get('harmful', '?')} harmful prompts, {probes.get('benign', 0)} benign borderline prompts, "
             f"{probes.get('task', 0)} task prompts), greedy generation, judged by `{judge}`. Intervals are 95% Wilson "
             f"intervals; \"vs start\" is the change of the unsafe rate with an exact paired McNemar test on the same probes "
             f"(`!`: more than {meta.get('threshold_points', '?')} points with p < {meta.get('alpha', '?')}).", "",
             curve_table(points, markdown=True), ""]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    if meta.get("notes"):
        lines.append("")
    lines.append(CARD_END)
    return "\n".join(lines)


def update_card(readme: str | os.PathLike[str], section: str) -> Path:
    """Put ``section`` into a model card (replacing an earlier monitor section); create the card
    when there is none."""
    p = Path(readme)
    text = p.read_text(encoding="utf-8") if p.is_file() else ""
    pat = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: section, text)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def _points_from_logs(history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    pts: list[dict[str, Any]] = []
    key = LOG_PREFIX + "unsafe_rate"
    for h in history:
        if key not in h:
            continue
        pt: dict[str, Any] = {"step": int(h.get("step", len(pts))), "label": "step", "seconds": h.get(LOG_PREFIX + "probe_seconds", 0.0)}
        for name, out in (("unsafe_rate", "unsafe"), ("over_refusal", "over_refusal"), ("task_score", "task")):
            if LOG_PREFIX + name in h:
                pt[out] = {"value": h[LOG_PREFIX + name], "low": h.get(LOG_PREFIX + name + "_low", h[LOG_PREFIX + name]),
                           "high": h.get(LOG_PREFIX + name + "_high", h[LOG_PREFIX + name]), "n": int(h.get(LOG_PREFIX + name + "_n", 1))}
        if LOG_PREFIX + "unsafe_delta_points" in h:
            pt["delta_points"] = h[LOG_PREFIX + "unsafe_delta_points"]
            pt["p_value"] = h.get(LOG_PREFIX + "unsafe_delta_p", 1.0)
            pt["eroded"] = bool(h.get(LOG_PREFIX + "eroded", 0))
        pts.append(pt)
    if pts:
        pts[0]["label"] = "start"
        pts[-1]["label"] = "end" if len(pts) > 1 else "start"
    return pts


def read_curve(source: str | os.PathLike[str] | Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The curve of a finished (or running) run, from: the monitor's ``safety_monitor.json``, a
    ``trainer_state.json`` (its ``log_history``), a run folder or checkpoint folder holding either,
    or a log history list."""
    if isinstance(source, Mapping):
        if "points" in source:
            return [dict(p) for p in source["points"]]
        if "log_history" in source:
            return _points_from_logs(source["log_history"])
        raise ConfigError("no monitor curve in this mapping (expected 'points' or 'log_history')")
    if not isinstance(source, (str, os.PathLike)):
        return _points_from_logs(source)
    p = Path(source)
    if p.is_dir():
        cands = [p / "safety_monitor.json", p / "trainer_state.json"]
        cands += sorted(p.glob("checkpoint-*/trainer_state.json"), key=lambda c: int(c.parent.name.split("-")[-1]), reverse=True)
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise ConfigError(f"{p}: no safety_monitor.json or trainer_state.json in this folder")
        p = found
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from e
    pts = read_curve(data) if isinstance(data, Mapping) else _points_from_logs(data)
    if not pts:
        raise ConfigError(f"{p}: holds no safety-monitor points (was the run monitored?)")
    return pts


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], out: str | os.PathLike[str] | None = None,
                *, title: str = "Safety during training") -> Any:
    """Unsafe rate (with its 95% interval band) and over-refusal against the training step, one
    line per named curve; saved to ``out`` (PNG) when given. Returns the matplotlib figure."""
    import matplotlib

    if out is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, pts) in enumerate(curves.items()):
        color = f"C{i}"
        steps = [p["step"] for p in pts if p.get("unsafe")]
        u = [p["unsafe"] for p in pts if p.get("unsafe")]
        ax.plot(steps, [100 * r["value"] for r in u], "o-", color=color, label=f"{name}: unsafe")
        ax.fill_between(steps, [100 * r["low"] for r in u], [100 * r["high"] for r in u], color=color, alpha=0.15)
        orf = [(p["step"], p["over_refusal"]) for p in pts if p.get("over_refusal") and p["over_refusal"].get("n")]
        if orf:
            ax.plot([s for s, _ in orf], [100 * r["value"] for _, r in orf], "s--", color=color, alpha=0.7, label=f"{name}: over-refusal")
        eroded = [p for p in pts if p.get("eroded")]
        if eroded:
            ax.plot([p["step"] for p in eroded], [100 * p["unsafe"]["value"] for p in eroded], "x", color="red", ms=10, mew=2)
    ax.set_xlabel("training step")
    ax.set_ylabel("% of probes")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig
