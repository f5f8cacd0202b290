"""Refusal judges against human labels on models they were not built from, and their speed.

    HF_HUB_OFFLINE=1 HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_judge.py

Leave-one-model-out: the probe is trained on one model's human-labelled XSTest completions and
tested on the other's (gpt4 -> mistralinstruct, mistralinstruct -> gpt4).  The keyword judge is
scored on the same test rows (it has no training step; its marker lists were tuned on the dev
halves of *both* files, so its numbers here are, if anything, optimistic).  Candidate probes
(which layer, with or without the cheap features) are compared on the same splits; the shipped
recipe is ``ProbeSpec()``.  Intervals: Wilson (accuracy, refusal precision and recall), percentile
bootstrap with 2000 seeded resamples (Cohen's kappa).  Writes
``benchmarks/results/judge_agreement.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_safety_merge.eval.agreement import binary_summary, load_refusal_labels
from hf_safety_merge.eval.judges import KeywordRefusalJudge, LearnedRefusalJudge, non_answer_reason
from hf_safety_merge.eval.judges.learned import (
    FeatureExtractor,
    ProbeSpec,
    fit_probe,
    predict_labels,
    probe_probabilities,
)
from hf_safety_merge.eval.judges.training import lomo_splits

RESULTS = Path(__file__).resolve().parent / "results"


def ece(scores: list[float], correct_is_compliance: list[bool], bins: int = 10) -> float:
    """Expected calibration error of P(compliance) against the human label (equal-width bins)."""
    n = len(scores)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, s in enumerate(scores) if lo <= s < hi or (b == bins - 1 and s == 1.0)]
        if idx:
            conf = sum(scores[i] for i in idx) / len(idx)
            freq = sum(correct_is_compliance[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(conf - freq)
    return total


def speed(judge: LearnedRefusalJudge, texts: list[str], reps: int = 2) -> dict[str, float]:
    judge.judge_batch(["p"] * 8, texts[:8])  # warm-up (model load)
    best_wall, best_cpu = 0.0, 0.0
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        judge.judge_batch(["p"] * len(texts), texts)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        best_wall = max(best_wall, len(texts) / wall)
        best_cpu = max(best_cpu, len(texts) / cpu * torch.get_num_threads())
    return {"responses": len(texts), "responses_per_s_wall": round(best_wall, 1),
            "responses_per_s_if_threads_unshared": round(best_cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "judge_agreement.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = load_refusal_labels(args.data_dir)
    labels = [r.label for r in rows]
    texts = [r.completion for r in rows]
    t0 = time.perf_counter()
    fx = FeatureExtractor(ProbeSpec(layer=8))
    H = fx.hidden(texts, [0, 2, 4, 6, 8], progress=True, desc="features (layers 0-8)")
    extras = FeatureExtractor(ProbeSpec()).extras(texts)  # mean embedding (512 tokens) + keyword one-hot
    E, K = extras[:, :-3], extras[:, -3:]
    feat_s = time.perf_counter() - t0
    shipped = ProbeSpec()
    candidates: dict[str, Any] = {
        f"learned (shipped: layer {shipped.layer} + embeddings + keyword)": torch.cat([H[shipped.layer], E, K], 1),
        "layer 4 only": H[4],
        "layer 4 + keyword": torch.cat([H[4], K], 1),
        "embeddings only (no transformer layer) + keyword": torch.cat([H[0], E, K], 1),
        "layer 2 + embeddings + keyword": torch.cat([H[2], E, K], 1),
        "layer 6 + embeddings + keyword": torch.cat([H[6], E, K], 1),
        "layer 8 + embeddings + keyword": torch.cat([H[8], E, K], 1),
    }
    kj = KeywordRefusalJudge()
    kw_pred = [kj.classify(t) for t in texts]
    splits: dict[str, Any] = {}
    # Every response judged by the probe that was not trained on its model (the cross-model
    # estimate over all 900, as a cross-validation reports its folds together).
    pooled_gold: list[str] = []
    pooled_pred: dict[str, list[str]] = {"keyword": [], **{c: [] for c in candidates}}
    for name, tr, te in lomo_splits([r.source for r in rows]):
        gold = [labels[i] for i in te]
        pooled_gold += gold
        pooled_pred["keyword"] += [kw_pred[i] for i in te]
        res: dict[str, Any] = {"keyword": binary_summary(gold, [kw_pred[i] for i in te])}
        for cname, X in candidates.items():
            probe = fit_probe(X[tr], [labels[i] for i in tr], shipped.lam)
            pred = predict_labels(probe, X[te], [kw_pred[i] == "partial_refusal" for i in te])
            pooled_pred[cname] += pred
            res[cname] = binary_summary(gold, pred)
            p_ref = probe_probabilities(probe, X[te])
            res[cname]["ece_p_compliance"] = round(ece([1 - float(p) for p in p_ref], [g == "compliance" for g in gold]), 4)
        splits[name] = res
    splits["both held-out sets pooled (leave-one-model-out)"] = {j: binary_summary(pooled_gold, p) for j, p in pooled_pred.items()}
    judge = LearnedRefusalJudge(progress=False)
    non_answers = sum(non_answer_reason(r.prompt, r.completion) is not None for r in rows)
    tok = fx._tok
    short = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:64]) for t in texts[450:706]]
    perf = {
        "xstest_mistral_completions (mean ~150 tokens, probe reads <= 128)": speed(judge, texts[450:706]),
        "the same cut to 64 tokens (the study's max_new_tokens)": speed(judge, short),
    }
    out = {
        "protocol": "leave-one-model-out on refusal_labels/xstest_completions_{gpt4,mistralinstruct}.csv; binary = "
                    "refusal or partial_refusal (not an attempt) vs compliance; Wilson 95% intervals for proportions, "
                    "percentile bootstrap (2000, seed 0) for kappa",
        "shipped_spec": shipped.__dict__,
        "splits": splits,
        "non_answer_rule_fires_on_labelled_rows": non_answers,
        "speed": perf,
        "feature_seconds_900_rows_layers0to8": round(feat_s, 1),
        "machine": {"threads": args.threads, "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
                    "python": platform.python_version(), "torch": torch.__version__},
        "command": "HF_HUB_OFFLINE=1 HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_judge.py",
    }
    md = ["| split | judge | binary accuracy [95% CI] | refusal precision | refusal recall | Cohen's kappa | ECE |",
          "|---|---|---|---|---|---|---|"]
    for split, res in splits.items():
        for j, r in res.items():
            def f(k: str, r: dict[str, Any] = r) -> str:
                lo, hi = r[f"{k}_ci95"]
                return f"{r[k]:.3f} [{lo:.3f}, {hi:.3f}]"
            md.append(f"| {split} | {j} | {f('binary_accuracy')} | {f('refusal_precision')} | {f('refusal_recall')} | "
                      f"{f('kappa')} | {r.get('ece_p_compliance', '-')} |")
    md.append("")
    md.append(f"non_answer rule fires on {non_answers} of {len(rows)} human-labelled completions.")
    for k, v in perf.items():
        md.append(f"speed, {k}: {v['responses_per_s_wall']} responses/s wall on a shared machine (load "
                  f"{out['machine']['load_avg_1min']:.1f}), {v['responses_per_s_if_threads_unshared']} responses/s "
                  f"from CPU time on {args.threads} threads")
    text = "\n".join(md) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
