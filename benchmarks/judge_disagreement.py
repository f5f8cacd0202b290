"""How often the learned and the keyword refusal judges disagree on the study's own responses.

    HF_HUB_OFFLINE=1 python benchmarks/judge_disagreement.py [ROOT ...]

Finds every ``generations.jsonl`` under the roots (default: ``demo_output/eval``, the study's
demo run, and ``benchmarks/results``, which holds the saved SmolLM2 evaluation), re-judges the
responses of the judged sets (``harmful``: the unsafe rate; ``benign``: over-refusal; the
``utility`` set is scored by its own metric, not by a judge) with

- ``learned``: the default judge (probe + clear-refusal markers), and
- ``keyword``: the zero-dependency judge,

and compares their *binary* decision (on the text the evaluation judges: a prefill attack's
forced opening plus the response, as ``evaluate_safety`` does): an attempt (``compliance``, the only unsafe label) or not
(``refusal``, ``partial_refusal``, or the learned judge's ``non_answer``).  Per model and set:
n, the disagreement rate with its 95% Wilson interval, and the two directions
(``learned attempt / keyword not``, ``learned not / keyword attempt``), plus how many responses
the markers took from the probe's ``compliance`` to ``refusal``.  No human labels exist for these
responses: a disagreement says which rates depend on the judge, not which judge is right.
Writes ``benchmarks/results/judge_disagreement.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JUDGED_SETS = ("harmful", "benign")


def find_generation_files(roots: list[Path]) -> list[Path]:
    files: set[Path] = set()
    for r in roots:
        if r.is_file() and r.name == "generations.jsonl":
            files.add(r.resolve())
        elif r.is_dir():
            files.update(p.resolve() for p in r.rglob("generations.jsonl"))
    return sorted(files)


def load_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            if d.get("set") in JUDGED_SETS:
                rows.append(d)
    return rows


def judged_text(row: dict[str, Any]) -> str:
    """What the evaluation judges (as ``evaluate_safety`` does): on a harmful prompt the assistant
    turn as the model produced it, i.e. a prefill attack's forced opening plus the response."""
    return f"{row.get('prefill', '')}{row['response']}" if row["set"] == "harmful" else row["response"]


def saved_labels(path: Path) -> dict[str, dict[str, str]]:
    """The labels a run saved beside its generations (``judgements.jsonl``), per judge and id."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out[str(d.get("judge"))][str(d["id"])] = str(d["label"])
    return out


def _group(path: Path, row: dict[str, Any]) -> tuple[str, str, str]:
    try:
        where = str(path.parent.parent.relative_to(ROOT))
    except ValueError:
        where = str(path.parent.parent)
    attack = row.get("attack") or "none"
    what = row["set"] if row["set"] == "benign" else f"harmful ({attack})"
    return where, str(row.get("model", path.parent.name)), what


def summarise(learned: list[str], probe: list[str], keyword: list[str]) -> dict[str, Any]:
    from hf_safety_merge.eval.metrics import wilson_interval

    n = len(learned)
    la = [x == "compliance" for x in learned]
    ka = [x == "compliance" for x in keyword]
    l_only = sum(a and not b for a, b in zip(la, ka))
    k_only = sum(b and not a for a, b in zip(la, ka))
    lo, hi = wilson_interval(l_only + k_only, n)
    return {
        "n": n,
        "disagree": l_only + k_only,
        "disagreement_rate": round((l_only + k_only) / n, 4) if n else None,
        "disagreement_ci95": [round(lo, 4), round(hi, 4)],
        "learned_attempt_keyword_not": l_only,
        "learned_not_keyword_attempt": k_only,
        "unsafe_or_attempt_rate_learned": round(sum(la) / n, 4) if n else None,
        "unsafe_or_attempt_rate_keyword": round(sum(ka) / n, 4) if n else None,
        "markers_overrule_probe": sum(p == "compliance" and q != "compliance" for p, q in zip(probe, learned)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="*", help="folders (or generations.jsonl files) to search; default: demo_output/eval and benchmarks/results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "judge_disagreement.json"))
    args = ap.parse_args(argv)

    import torch

    from hf_safety_merge.eval.judges import KeywordRefusalJudge, LearnedRefusalJudge
    from hf_safety_merge.eval.judges.markers import clear_refusal
    from hf_safety_merge.eval.judges.training import apply_markers

    torch.set_num_threads(args.threads)
    roots = [Path(r) for r in args.roots] or [ROOT / "demo_output" / "eval", RESULTS]
    files = find_generation_files(roots)
    if not files:
        print(f"no generations.jsonl under {[str(r) for r in roots]}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    probe_judge = LearnedRefusalJudge(markers=False, progress=False)
    kj = KeywordRefusalJudge()
    groups: dict[tuple[str, str, str], dict[str, list[str]]] = defaultdict(lambda: {"learned": [], "probe": [], "keyword": []})
    sources: dict[str, dict[str, Any]] = {}
    examples: list[dict[str, Any]] = []
    for f in files:
        rows = load_rows(f)
        if not rows:
            continue
        key = str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f)
        sources[key] = {"rows_judged": len(rows), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        resp = [judged_text(r) for r in rows]
        prompts = [r.get("original_prompt", r["prompt"]) if r["set"] == "harmful" else r["prompt"] for r in rows]
        probe = [v.label for v in probe_judge.judge_batch(prompts, resp)]
        learned = apply_markers(probe, [clear_refusal(t) is not None for t in resp])
        keyword = [kj.classify(t) for t in resp]
        saved = saved_labels(f.parent / "judgements.jsonl")
        for name, new in (("learned", learned), ("keyword", keyword)):
            pairs = [(saved[name][r["id"]], x) for r, x in zip(rows, new) if r["id"] in saved.get(name, {})]
            if pairs:  # does today's judge reproduce the labels the run saved?
                sources[key][f"saved_{name}_judgements_differ"] = f"{sum(a != b for a, b in pairs)} of {len(pairs)}"
        for r, p, lab, k in zip(rows, probe, learned, keyword):
            g = groups[_group(f, r)]
            g["probe"].append(p)
            g["learned"].append(lab)
            g["keyword"].append(k)
            if p != lab:
                examples.append({"id": r["id"], "model": r.get("model"), "response": judged_text(r)[:200]})
    table = []
    for (where, model, what), g in sorted(groups.items()):
        table.append({"responses": where, "model": model, "set": what, **summarise(g["learned"], g["probe"], g["keyword"])})
    for where in sorted({w for w, _, _ in groups}):
        for what in ("harmful", "benign"):
            keys = [k for k in groups if k[0] == where and k[2].startswith(what)]
            if len({k[1] for k in keys}) > 1 or len(keys) > 1:
                merged = {j: [x for k in sorted(keys) for x in groups[k][j]] for j in ("learned", "probe", "keyword")}
                table.append({"responses": where, "model": "all", "set": f"{what} (all)",
                              **summarise(merged["learned"], merged["probe"], merged["keyword"])})
    lines = [
        "| responses | model | set | n | disagree [95% CI] | learned attempt, keyword not | learned not, keyword attempt "
        "| attempt rate learned / keyword | markers overrule probe |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lo, hi = t["disagreement_ci95"]
        lines.append(f"| {t['responses']} | {t['model']} | {t['set']} | {t['n']} | {t['disagree']} = "
                     f"{100 * t['disagreement_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{t['learned_attempt_keyword_not']} | {t['learned_not_keyword_attempt']} | "
                     f"{100 * t['unsafe_or_attempt_rate_learned']:.1f}% / {100 * t['unsafe_or_attempt_rate_keyword']:.1f}% | "
                     f"{t['markers_overrule_probe']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    for k, v in sources.items():
        same = [f"{j}: {v[f'saved_{j}_judgements_differ']} differ" for j in ("learned", "keyword") if f"saved_{j}_judgements_differ" in v]
        if same:
            print(f"{k}: re-judged vs the run's saved judgements.jsonl: {'; '.join(same)}")
    out = {
        "protocol": "binary decision attempt (compliance) vs not (refusal, partial_refusal, non_answer); "
                    "learned = the default judge (probe + clear-refusal markers); Wilson 95% intervals; no human labels",
        "command": "HF_HUB_OFFLINE=1 python benchmarks/judge_disagreement.py",
        "sources": sources,
        "table": table,
        "markers_overruled_probe_examples": examples,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
