"""Agreement of a refusal judge with human labels (XSTest v2 completions).

    python -m hf_safety_merge.eval.agreement [--data-dir DIR] [--json out.json]

The human-labelled files ``refusal_labels/xstest_completions_*.csv`` (columns ``prompt``,
``completion``, ``final_label`` in ``1_full_compliance`` / ``2_full_refusal`` /
``3_partial_refusal``) are split by a seeded hash of ``file:id`` into a *dev* half (the keyword
judge's marker lists were adjusted while looking at its errors there) and a *held-out* half
(never looked at); both are reported, per file and pooled, with precision / recall / F1 per class
and for the binary refusal-vs-compliance decision.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .judges import Judge, KeywordRefusalJudge, LearnedRefusalJudge, get_judge

__all__ = [
    "LabelledCompletion",
    "agreement",
    "binary_summary",
    "cohen_kappa",
    "format_agreement",
    "format_binary",
    "load_refusal_labels",
]

HUMAN_LABELS = {"1_full_compliance": "compliance", "2_full_refusal": "refusal", "3_partial_refusal": "partial_refusal"}
CLASSES = ("compliance", "refusal", "partial_refusal")


@dataclass(frozen=True)
class LabelledCompletion:
    source: str
    id: str
    prompt: str
    completion: str
    label: str
    heldout: bool


def load_refusal_labels(data_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> list[LabelledCompletion]:
    """Every human-labelled completion in ``<data_dir>/refusal_labels/*.csv``."""
    from ..assets import data_dir as default_data_dir

    folder = (Path(data_dir) if data_dir is not None else default_data_dir()) / "refusal_labels"
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise ConfigError(f"no labelled completions (*.csv) in {folder}")
    out: list[LabelledCompletion] = []
    for f in files:
        with f.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            for col in ("prompt", "completion", "final_label"):
                if col not in (reader.fieldnames or []):
                    raise ConfigError(f"{f}: no column {col!r}")
            for i, row in enumerate(reader):
                lab = HUMAN_LABELS.get(row["final_label"].strip())
                if lab is None:
                    raise ConfigError(f"{f}: row {i} has final_label {row['final_label']!r}; expected {sorted(HUMAN_LABELS)}")
                rid = row.get("id") or str(i)
                short = f.stem.removeprefix("xstest_completions_")
                h = int(hashlib.sha256(f"{seed}\x00{short}:{rid}".encode()).hexdigest(), 16)
                out.append(LabelledCompletion(f.stem, rid, row["prompt"], row["completion"], lab, heldout=h % 2 == 1))
    return out


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "support": tp + fn}


def cohen_kappa(gold: Sequence[bool], pred: Sequence[bool]) -> float:
    """Cohen's kappa of two binary raters (1.0 = perfect, 0 = chance agreement)."""
    n = len(gold)
    if n == 0:
        return 0.0
    po = sum(g == p for g, p in zip(gold, pred)) / n
    pg, pp = sum(gold) / n, sum(pred) / n
    pe = pg * pp + (1 - pg) * (1 - pp)
    return (po - pe) / (1 - pe) if pe < 1 else 1.0


def binary_summary(gold: Sequence[str], pred: Sequence[str], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The binary refusal decision (``refusal`` or ``partial_refusal`` or ``non_answer``, i.e. not
    an attempt, vs ``compliance``) and 3-class accuracy, each with a 95% interval: Wilson score
    intervals for the proportions (accuracy, refusal precision and recall), a percentile bootstrap
    (``n_boot`` resamples of the rows, seeded) for Cohen's kappa."""
    import random

    from .metrics import wilson_interval

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    g = [x != "compliance" for x in gold]
    p = [x != "compliance" for x in pred]
    n = len(g)
    correct = sum(a == b for a, b in zip(g, p))
    tp = sum(a and b for a, b in zip(g, p))
    npred, ngold = sum(p), sum(g)
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot if n else 0):
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(cohen_kappa([g[i] for i in idx], [p[i] for i in idx]))
    boots.sort()

    def ci(k: int, m: int) -> list[float]:
        lo, hi = wilson_interval(k, m)
        return [round(lo, 4), round(hi, 4)]

    correct3 = sum(a == b for a, b in zip(gold, pred))
    return {
        "n": n,
        "n_refusal_gold": ngold,
        "binary_accuracy": correct / n if n else 0.0,
        "binary_accuracy_ci95": ci(correct, n),
        "refusal_precision": tp / npred if npred else 0.0,
        "refusal_precision_ci95": ci(tp, npred),
        "refusal_recall": tp / ngold if ngold else 0.0,
        "refusal_recall_ci95": ci(tp, ngold),
        "kappa": cohen_kappa(g, p),
        "kappa_ci95": [round(boots[int(0.025 * len(boots))], 4), round(boots[int(0.975 * len(boots)) - 1], 4)] if boots else [0.0, 0.0],
        "accuracy_3class": correct3 / n if n else 0.0,
        "accuracy_3class_ci95": ci(correct3, n),
        "confusion": {f"{a}->{b}": v for (a, b), v in sorted(Counter(zip(gold, pred)).items())},
    }


def agreement(judge: Judge, rows: Sequence[LabelledCompletion]) -> dict[str, Any]:
    """Confusion matrix, accuracy, per-class and binary (refusal+partial vs compliance) P/R/F1."""
    preds = [judge.judge(r.prompt, r.completion).label for r in rows]
    gold = [r.label for r in rows]
    conf = Counter(zip(gold, preds))
    per_class = {}
    for c in CLASSES:
        tp = conf[(c, c)]
        fp = sum(v for (g, p), v in conf.items() if p == c and g != c)
        fn = sum(v for (g, p), v in conf.items() if g == c and p != c)
        per_class[c] = _prf(tp, fp, fn)
    refused_g = [g != "compliance" for g in gold]
    refused_p = [p != "compliance" for p in preds]
    tp = sum(g and p for g, p in zip(refused_g, refused_p))
    fp = sum(p and not g for g, p in zip(refused_g, refused_p))
    fn = sum(g and not p for g, p in zip(refused_g, refused_p))
    n = len(rows)
    macro = sum(v["f1"] for v in per_class.values()) / len(per_class)
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(gold, preds)) / n if n else 0.0,
        "binary_accuracy": sum(g == p for g, p in zip(refused_g, refused_p)) / n if n else 0.0,
        "macro_f1": macro,
        "per_class": per_class,
        "binary_refusal": _prf(tp, fp, fn),
        "confusion": {f"{g}->{p}": v for (g, p), v in sorted(conf.items())},
    }


def format_agreement(name: str, res: dict[str, Any]) -> str:
    """A Markdown table of one agreement result."""
    lines = [
        f"**{name}** (n={res['n']}; 3-class accuracy {res['accuracy']:.3f}, macro-F1 {res['macro_f1']:.3f}; "
        f"binary refusal-vs-compliance accuracy {res['binary_accuracy']:.3f})",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for c, v in [*res["per_class"].items(), ("refusal or partial (binary)", res["binary_refusal"])]:
        lines.append(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |")
    return "\n".join(lines) + "\n"


def format_binary(name: str, res: dict[str, Any]) -> str:
    """One line of a :func:`binary_summary`: accuracy, refusal precision/recall, kappa, with 95% intervals."""

    def f(key: str) -> str:
        lo, hi = res[f"{key}_ci95"]
        return f"{res[key]:.3f} [{lo:.3f}, {hi:.3f}]"

    return (f"  {name} (n={res['n']}): binary accuracy {f('binary_accuracy')}, refusal precision "
            f"{f('refusal_precision')}, recall {f('refusal_recall')}, kappa {f('kappa')}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Agreement of a refusal judge with the XSTest human labels.")
    ap.add_argument("--data-dir", default=None, help="public data folder (default: HF_SAFETY_DATA_DIR or ../shared/data)")
    ap.add_argument("--judge", default="keyword", help="keyword (default); learned: its leave-one-model-out numbers; auto: both")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    args = ap.parse_args(argv)
    spec = args.judge.strip().casefold()
    judge = KeywordRefusalJudge() if spec in ("keyword", "auto") else get_judge(args.judge)
    if isinstance(judge, LearnedRefusalJudge):
        _print_learned(judge)
        return 0
    rows = load_refusal_labels(args.data_dir)
    groups: dict[str, list[LabelledCompletion]] = {
        "held-out half, both files": [r for r in rows if r.heldout],
        "dev half, both files": [r for r in rows if not r.heldout],
        "all rows, both files": rows,
    }
    for src in sorted({r.source for r in rows}):
        groups[f"all rows, {src}"] = [r for r in rows if r.source == src]
    results = {k: agreement(judge, v) for k, v in groups.items()}
    for k, v in results.items():
        print(format_agreement(k, v))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"judge": judge.describe(), "results": results}, indent=2) + "\n")
    if spec == "auto":
        from .judges import learned_judge_unavailable

        reason = learned_judge_unavailable()
        if reason is None:
            _print_learned(LearnedRefusalJudge())
        else:
            print(f"(learned judge not shown: {reason})")
    return 0


def _print_learned(judge: LearnedRefusalJudge) -> None:
    # It was trained on every one of these rows: agreement on them would be a dev-set fit.
    print("**learned**: trained on all the XSTest completions, so its honest agreement is leave-one-model-out "
          "(recorded in its weights; full table: python benchmarks/bench_judge.py):")
    for name, res in judge.describe().get("agreement", {}).items():
        if isinstance(res, dict):
            print(format_binary(name, res))


if __name__ == "__main__":
    sys.exit(main())
