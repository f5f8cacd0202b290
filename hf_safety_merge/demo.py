"""The README's main job (for now): prepare small real checkpoints, distil nothing, just
compute a safety vector, patch a fine-tune with EnchTable and RESTA, load the result and
generate, and print a summary table."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def run_demo(out: Path, progress: bool = True) -> dict[str, dict[str, float]]:
    from transformers import AutoModelForCausalLM

    from .config import SafetyMergeConfig
    from .merge import merge
    from .testing import make_family
    from .vectors import SafetyVector

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ck = out / "checkpoints"
    print(f"[1/4] preparing tiny real Llama checkpoints (aligned, harmful fine-tune, task fine-tune) in {ck}")
    paths = make_family(ck, "llama", seed=0, max_shard_size="500KB") if not (ck / "task").exists() else {
        n: ck / n for n in ("base", "aligned", "harmful", "task")
    }
    print("[2/4] computing the safety vector Delta_s = aligned - harmful")
    vec = SafetyVector.compute(paths["aligned"], paths["harmful"], out / "safety_vector", overwrite=True, progress=progress)
    print(f"      {vec!r}")
    rows: dict[str, dict[str, float]] = {}
    print("[3/4] merging into the task fine-tune")
    for method, params in (("enchtable", {"beta": 0.1}), ("task_arithmetic", {"beta": 1.0})):
        cfg = SafetyMergeConfig(
            task_model=str(paths["task"]),
            task_reference=str(paths["aligned"]),
            safety_vector=str(out / "safety_vector"),
            method=method,
            parameters=params,
            output_dir=str(out / f"patched-{method}"),
            max_shard_size="1MB",
            overwrite=True,
        )
        res = merge(cfg, progress=progress)
        print(res)
        rows[method] = {"seconds": res.seconds, **{k: float(v) for k, v in res.summary.items() if isinstance(v, int | float)}}
    print("[4/4] loading the patched model with AutoModelForCausalLM and generating")
    model = AutoModelForCausalLM.from_pretrained(out / "patched-enchtable")
    ids = torch.tensor([[1, 5, 9, 42]])
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"      generated token ids: {gen[0].tolist()}")
    print("\n| method | seconds | alpha | w_mean | w_min |")
    print("| --- | --- | --- | --- | --- |")
    for m, r in rows.items():
        print(f"| {m} | {r['seconds']:.2f} | {r.get('alpha', float('nan')):.4g} | {r.get('w_mean', float('nan')):.4g} | {r.get('w_min', float('nan')):.4g} |")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s; patched model and card: {out / 'patched-enchtable'}")
    return rows
