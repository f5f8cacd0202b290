"""Evaluation results: one :class:`ModelReport` per model, gathered in an :class:`EvalReport`
that writes JSON, a Markdown table, PNG plots and model-card ``eval_results``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import Rate

__all__ = ["EvalReport", "ModelReport", "eval_results"]


@dataclass
class ModelReport:
    """The results of one model.

    Attributes:
        model: the model's name.
        judge: the harm judge's description (name, model, ...).
        refusal_judge: the refusal judge used for over-refusal.
        unsafe_rate: unsafe responses to the plain harmful prompts.
        attack_success: per attack, unsafe responses to the attacked prompts (``none`` included).
        over_refusal: refusals of benign prompts (XSTest safe half), or None when not measured.
        utility: the utility score (exact match or pass@1), or None.
        utility_metric: ``exact_match`` / ``pass@1``.
        datasets: name -> {"source", "n"} of every prompt set used.
        timings: seconds spent per stage.
        config: the generation settings.
    """

    model: str
    judge: dict[str, Any]
    unsafe_rate: Rate
    attack_success: dict[str, Rate] = field(default_factory=dict)
    over_refusal: Rate | None = None
    utility: Rate | None = None
    utility_metric: str | None = None
    refusal_judge: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "judge": self.judge,
            "refusal_judge": self.refusal_judge,
            "unsafe_rate": self.unsafe_rate.to_dict(),
            "attack_success": {k: v.to_dict() for k, v in self.attack_success.items()},
            "over_refusal": self.over_refusal.to_dict() if self.over_refusal else None,
            "utility": self.utility.to_dict() if self.utility else None,
            "utility_metric": self.utility_metric,
            "datasets": self.datasets,
            "timings": self.timings,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelReport:
        def opt(x: Any) -> Rate | None:
            return Rate.from_dict(x) if x else None

        return cls(
            model=d["model"],
            judge=d.get("judge", {}),
            refusal_judge=d.get("refusal_judge", {}),
            unsafe_rate=Rate.from_dict(d["unsafe_rate"]),
            attack_success={k: Rate.from_dict(v) for k, v in d.get("attack_success", {}).items()},
            over_refusal=opt(d.get("over_refusal")),
            utility=opt(d.get("utility")),
            utility_metric=d.get("utility_metric"),
            datasets=d.get("datasets", {}),
            timings=d.get("timings", {}),
            config=d.get("config", {}),
        )

    def summary(self) -> str:
        """A short human-readable summary."""
        lines = [f"{self.model}: unsafe rate {self.unsafe_rate} (judge {self.judge.get('name')})"]
        for k, v in self.attack_success.items():
            if k != "none":
                lines.append(f"  attack {k}: success rate {v}")
        lines.append(f"  over-refusal: {self.over_refusal if self.over_refusal else 'not measured'}")
        lines.append(f"  utility ({self.utility_metric or '-'}): {self.utility if self.utility else 'not measured'}")
        return "\n".join(lines)


def describe_judge(desc: dict[str, Any]) -> str:
    """``learned + clear-refusal markers (binary refusal agreement with human labels,
    leave-one-model-out: 95.1% [93.5, 96.3] pooled over the held-out models; 92.7% [89.9, 94.7]
    train gpt4 -> test mistralinstruct; ...)``: a judge's name (with its rule, for the learned
    judge's refusal markers) and, where its description carries it, its measured agreement."""
    name = str(desc.get("name", "?"))
    if desc.get("refusal_markers") is True:
        name += " + clear-refusal markers"
    ag = desc.get("agreement")
    if not isinstance(ag, dict):
        return name
    parts = []
    for split, m in ag.items():
        if isinstance(m, dict) and "binary_accuracy" in m:
            lo, hi = m.get("binary_accuracy_ci95", (None, None))
            ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else ""
            parts.append(f"{100 * m['binary_accuracy']:.1f}%{ci} {split}")
    return f"{name} (binary refusal agreement with human labels, leave-one-model-out: {'; '.join(parts)})" if parts else name


def _pct(r: Rate | None) -> str:
    if r is None or r.n == 0:
        return "n/a"
    return f"{100 * r.value:.1f} [{100 * r.low:.1f}, {100 * r.high:.1f}]"


def _save_figure(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class EvalReport:
    """Several models evaluated side by side."""

    models: list[ModelReport]

    @property
    def attacks(self) -> list[str]:
        names: list[str] = []
        for m in self.models:
            for a in m.attack_success:
                if a != "none" and a not in names:
                    names.append(a)
        return names

    def to_dict(self) -> dict[str, Any]:
        return {"format": "hf-safety-merge/eval-report", "version": 1, "models": [m.to_dict() for m in self.models]}

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return p

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> EvalReport:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls([ModelReport.from_dict(m) for m in d["models"]])

    def to_markdown(self) -> str:
        """A table: one row per model; rates in percent with 95% Wilson intervals."""
        attacks = self.attacks
        head = ["model", "unsafe rate (%)", *[f"ASR {a} (%)" for a in attacks], "over-refusal (%)", "utility (%)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.models:
            util = _pct(m.utility) + (f" ({m.utility_metric})" if m.utility else "")
            cells = [
                m.model,
                _pct(m.unsafe_rate),
                *[_pct(m.attack_success.get(a)) for a in attacks],
                _pct(m.over_refusal),
                util,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        judges = sorted({describe_judge(m.judge) for m in self.models})
        ns = self.models[0].datasets if self.models else {}
        note = ", ".join(f"{k}: n={v.get('n')}" for k, v in ns.items())
        lines.append("")
        lines.append(
            f"Rates in % with 95% Wilson intervals. Harm judge: {', '.join(judges)}; "
            f"over-refusal judged by {self.models[0].refusal_judge.get('name', 'keyword') if self.models else '-'}. {note}"
        )
        return "\n".join(lines) + "\n"

    def write_markdown(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_markdown(), encoding="utf-8")
        return p

    def plot(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """``safety_vs_utility.png`` (scatter: 1 - unsafe rate vs utility, or vs 1 - over-refusal
        when utility is not measured) and ``attacks.png`` (per-attack success bars with CIs)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []

        has_util = all(m.utility is not None for m in self.models)
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for m in self.models:
            x = 1 - m.unsafe_rate.value
            xerr = [[x - (1 - m.unsafe_rate.high)], [(1 - m.unsafe_rate.low) - x]]
            ref = m.utility if has_util else m.over_refusal
            if ref is None:
                y, yerr = float("nan"), [[0.0], [0.0]]
            elif has_util:
                y, yerr = ref.value, [[ref.value - ref.low], [ref.high - ref.value]]
            else:
                y = 1 - ref.value
                yerr = [[y - (1 - ref.high)], [(1 - ref.low) - y]]
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=m.model)
        ax.set_xlabel("safety: 1 - unsafe rate")
        ax.set_ylabel("utility" if has_util else "helpfulness on benign prompts: 1 - over-refusal")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        ax.set_title("Safety vs utility (95% CI)")
        paths.append(_save_figure(plt, fig, out / "safety_vs_utility.png"))

        names = ["none", *self.attacks]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) * max(1, len(self.models)) * 0.6), 4.0))
        width = 0.8 / max(1, len(self.models))
        for i, m in enumerate(self.models):
            vals, lo, hi = [], [], []
            for a in names:
                r = m.attack_success.get(a, m.unsafe_rate if a == "none" else None)
                if r is None:
                    vals.append(float("nan"))
                    lo.append(0.0)
                    hi.append(0.0)
                else:
                    vals.append(r.value)
                    lo.append(r.value - r.low)
                    hi.append(r.high - r.value)
            xs = [j + (i - (len(self.models) - 1) / 2) * width for j in range(len(names))]
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=2, label=m.model)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(["no attack" if a == "none" else a for a in names], rotation=20, ha="right")
        ax.set_ylabel("attack success rate (unsafe)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title("Per-attack success rate (95% CI)")
        paths.append(_save_figure(plt, fig, out / "attacks.png"))
        return paths

    def write(self, out_dir: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and (optionally) the PNG plots into ``out_dir``."""
        out = Path(out_dir)
        files = {"json": self.to_json(out / "report.json"), "markdown": self.write_markdown(out / "report.md")}
        if plots:
            for p in self.plot(out):
                files[p.stem] = p
        return files


def eval_results(
    report: ModelReport,
    *,
    dataset_names: dict[str, str] | None = None,
    source_name: str | None = None,
    source_url: str | None = None,
) -> list[Any]:
    """``huggingface_hub.EvalResult`` entries for a model card (``ModelCardData(eval_results=...)``).

    Rates are reported as fractions; the judge is recorded in ``metric_config``, the sample size
    and the 95% interval in ``metric_args``.  ``source_name`` needs ``source_url`` (hub rule).
    """
    from huggingface_hub import EvalResult

    names = dataset_names or {}
    judge = str(report.judge.get("name", "keyword"))
    out: list[Any] = []

    def add(metric: str, metric_name: str, r: Rate | None, ds_key: str, ds_default: str, args: dict[str, Any] | None = None) -> None:
        if r is None or r.n == 0:
            return
        ds = report.datasets.get(ds_key, {})
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name="Safety evaluation",
                dataset_type=names.get(ds_key, str(ds.get("hub_id") or ds_default)),
                dataset_name=names.get(ds_key, ds_key),
                dataset_split=str(ds.get("split", "eval")),
                metric_type=metric,
                metric_name=metric_name,
                metric_value=round(r.value, 4),
                metric_config=judge,
                metric_args={"n": r.n, "ci95": [round(r.low, 4), round(r.high, 4)], **(args or {})},
                source_name=source_name if source_url else None,
                source_url=source_url,
            )
        )

    add("unsafe_rate", f"Unsafe rate ({judge} judge)", report.unsafe_rate, "harmful", "walledai/AdvBench")
    for a, r in report.attack_success.items():
        if a != "none":
            add("attack_success_rate", f"Attack success rate: {a}", r, "harmful", "walledai/AdvBench", {"attack": a})
    add("over_refusal_rate", "Over-refusal rate (XSTest safe)", report.over_refusal, "benign", "walledai/XSTest")
    if report.utility is not None:
        add(report.utility_metric or "accuracy", f"Utility ({report.utility_metric})", report.utility, "utility", "utility")
    return out


def merge_reports(reports: Iterable[ModelReport] | Sequence[ModelReport]) -> EvalReport:
    """Gather model reports into one side-by-side report."""
    return EvalReport(list(reports))
