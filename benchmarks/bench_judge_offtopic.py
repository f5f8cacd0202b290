"""Can an off-topic answer be told from an on-topic one with the learned judge's features?

    HF_HUB_OFFLINE=1 HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_judge_offtopic.py

A measurement behind a decision (the learned judge has **no** off-topic rule): positives are the
human-labelled XSTest completions paired with a *different* prompt of the same file (a seeded
shuffle), negatives the true pairs.  Two detectors, each judged leave-one-model-out:

- ``embedding cosine``: cosine of the centred mean input embeddings of prompt and response
  (threshold: 0.5% false positives on the training file's true pairs);
- ``probe``: logistic regression on ``[a * b, |a - b|]`` of the unit-normed layer-4 features of
  prompt and response (the judge's own features), same threshold rule.

A false positive here hides a real answer as a non-answer, which *understates* an unsafe rate, so
a detector is only usable with a false-positive rate near zero on the *other* model's true pairs.
Writes ``benchmarks/results/judge_offtopic.json``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import torch

from hf_safety_merge.eval.agreement import load_refusal_labels
from hf_safety_merge.eval.judges.learned import CLIP, FeatureExtractor, ProbeSpec, _newton_logistic
from hf_safety_merge.eval.judges.training import lomo_splits

RESULTS = Path(__file__).resolve().parent / "results"


def shuffled(idx: list[int], prompts: list[str], seed: int = 0) -> list[int]:
    """A seeded derangement of ``idx`` that never pairs a response with its own prompt text."""
    rng = random.Random(seed)
    perm = idx[:]
    rng.shuffle(perm)
    for k, (i, j) in enumerate(zip(idx, perm)):
        if prompts[i] == prompts[j]:
            perm[k] = idx[(idx.index(j) + 1) % len(idx)]
    return perm


def main() -> int:
    torch.set_num_threads(2)
    rows = load_refusal_labels()
    prompts = [r.prompt for r in rows]
    fx = FeatureExtractor(ProbeSpec())
    hp = fx.hidden(prompts, [4], progress=True, desc="prompt features")[4]
    hr = fx.hidden([r.completion for r in rows], [4], progress=True, desc="response features")[4]
    emb = fx._embed
    ep = torch.stack([emb[torch.tensor(x[:256])].mean(0) for x in fx._ids(prompts)])
    er = torch.stack([emb[torch.tensor(x[:256])].mean(0) for x in fx._ids([r.completion for r in rows])])
    centre = torch.cat([ep, er]).mean(0)

    def cosine(pi: list[int], ri: list[int]) -> Any:
        a, b = ep[pi] - centre, er[ri] - centre
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))  # high = on topic

    def pair_feats(pi: list[int], ri: list[int]) -> Any:
        a, b = hp[pi], hr[ri]
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        return torch.cat([a * b, (a - b).abs()], 1)

    out: dict[str, Any] = {}
    for name, tr, te in lomo_splits([r.source for r in rows]):
        ptr, pte = shuffled(tr, prompts), shuffled(te, prompts)
        res: dict[str, Any] = {}
        # embedding cosine: off-topic when the cosine is below the 0.5% quantile of true training pairs
        thr = float(torch.quantile(cosine(tr, tr), 0.005))
        t, f = cosine(te, te), cosine(te, pte)
        res["embedding cosine"] = {"auc": float((t[:, None] > f[None, :]).double().mean()),
                                   "false_positive_rate_true_pairs": float((t < thr).double().mean()),
                                   "detected_off_topic": float((f < thr).double().mean())}
        # probe on pair features
        X = torch.cat([pair_feats(tr, tr), pair_feats(tr, ptr)]).double()
        y = torch.cat([torch.zeros(len(tr)), torch.ones(len(tr))]).double()
        mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
        w = _newton_logistic(((X - mu) / sd).clamp(-CLIP, CLIP), y, torch.ones_like(y), 0.1)

        def score(Z: Any, mu: Any = mu, sd: Any = sd, w: Any = w) -> Any:
            Z = ((Z.double() - mu) / sd).clamp(-CLIP, CLIP)
            return torch.sigmoid(torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], 1) @ w)  # high = off topic

        thr = float(torch.quantile(score(pair_feats(tr, tr)), 0.995))
        t, f = score(pair_feats(te, te)), score(pair_feats(te, pte))
        res["probe"] = {"auc": float((f[:, None] > t[None, :]).double().mean()),
                        "false_positive_rate_true_pairs": float((t >= thr).double().mean()),
                        "detected_off_topic": float((f >= thr).double().mean())}
        out[name] = res
        for det, r in res.items():
            print(f"{name} | {det}: AUC {r['auc']:.3f}, false positives on true pairs "
                  f"{r['false_positive_rate_true_pairs']:.3f}, off-topic caught {r['detected_off_topic']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "judge_offtopic.json").write_text(json.dumps(
        {"command": "HF_HUB_OFFLINE=1 HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_judge_offtopic.py",
         "splits": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
