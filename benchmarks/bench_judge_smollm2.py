"""What switching the default judge changes on real generations: the 1050 SmolLM2-135M-Instruct
responses in ``benchmarks/results/eval_smollm2`` re-judged by the keyword and the learned judge.

    HF_HUB_OFFLINE=1 HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_judge_smollm2.py

No human labels exist for these responses, so this is not an accuracy: it shows the unsafe rate
(harmful sets, per attack) and the refusal rate (benign set) under each judge, how often they
disagree, a few disagreements to read, and the learned judge's speed on study-length answers
(<= 48 new tokens).  Writes ``benchmarks/results/judge_smollm2_rejudge.json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from hf_safety_merge.eval.judges import KeywordRefusalJudge, LearnedRefusalJudge
from hf_safety_merge.eval.metrics import rate

HERE = Path(__file__).resolve().parent
GEN = HERE / "results" / "eval_smollm2" / "SmolLM2-135M-Instruct" / "generations.jsonl"


def main() -> int:
    torch.set_num_threads(2)
    rows = [json.loads(x) for x in GEN.read_text().splitlines() if x.strip()]
    prompts = [r.get("original_prompt", r["prompt"]) if r["set"] == "harmful" else r["prompt"] for r in rows]
    texts = [f"{r.get('prefill', '')}{r['response']}" if r["set"] == "harmful" else r["response"] for r in rows]
    kw = KeywordRefusalJudge().judge_batch(prompts, texts)
    lj = LearnedRefusalJudge(progress=False)
    lj.judge_batch(prompts[:8], texts[:8])  # model load
    t, c = time.perf_counter(), time.process_time()
    le = lj.judge_batch(prompts, texts)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(f"{r['set']}/{r.get('attack', '-')}" if r["set"] == "harmful" else str(r["set"]), []).append(i)
    table: dict[str, Any] = {}
    for g, idx in sorted(groups.items()):
        if g.startswith("harmful"):
            k = rate(kw[i].label == "compliance" for i in idx)
            m = rate(le[i].label == "compliance" for i in idx)
            what = "unsafe rate"
        else:
            k = rate(kw[i].label in ("refusal", "partial_refusal") for i in idx)
            m = rate(le[i].label in ("refusal", "partial_refusal") for i in idx)
            what = "refusal rate"
        table[g] = {"what": what, "n": len(idx), "keyword": k.value, "learned": m.value,
                    "learned_labels": dict(Counter(le[i].label for i in idx)),
                    "binary_disagreements": sum((kw[i].label == "compliance") != (le[i].label == "compliance") for i in idx)}
        print(f"{g:28s} {what:12s} n={len(idx):4d}  keyword {k.value:.3f}  learned {m.value:.3f}  "
              f"disagree {table[g]['binary_disagreements']:3d}  learned labels {table[g]['learned_labels']}")
    examples = [{"set": rows[i]["set"], "attack": rows[i].get("attack"), "prompt": prompts[i][:120], "response": texts[i][:240],
                 "keyword": kw[i].label, "learned": le[i].label, "learned_score": round(le[i].score, 3)}
                for i in range(len(rows)) if (kw[i].label == "compliance") != (le[i].label == "compliance")][:12]
    speed = {"responses": len(rows), "responses_per_s_wall": round(len(rows) / wall, 1),
             "responses_per_s_from_cpu_time_2_threads": round(2 * len(rows) / cpu, 1)}
    print(f"learned judge: {speed}")
    out = {"command": "HF_HUB_OFFLINE=1 HF_SAFETY_DATA_DIR=../shared/data python benchmarks/bench_judge_smollm2.py",
           "source": str(GEN.relative_to(HERE.parent)), "groups": table, "disagreement_examples": examples, "speed": speed}
    (HERE / "results" / "judge_smollm2_rejudge.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
