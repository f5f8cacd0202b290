"""AsFT penalty alone, forward + backward: the per-module loop vs the batched form (one bmm per
group of same-shape modules), on a model's LoRA layout, interleaved repeats (min and median).

    python benchmarks/bench_asft_penalty.py [--model smollm2] [--device cuda] [--targets qv,all]

Prints a table and writes `benchmarks/results/bench_asft_penalty[_<tag>].json`. Random
weights from the model's config (the penalty's cost depends on shapes only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--targets", default="qv,all")
    p.add_argument("--projectors", default="safe_lora,topk")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=20, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timings of each form")
    p.add_argument("--tag", default="")
    a = p.parse_args(argv)
    import tempfile

    import torch
    from bench_asft import TARGETS, _model_path, _random_anchors
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_safety_merge.training import anchored_penalty
    from hf_safety_merge.training.asft.binding import bind_anchors, find_lora_targets

    def sync() -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = _model_path(a.model, Path(tmp))
        for targets in a.targets.split(","):
            for projector in a.projectors.split(","):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
                anchors = _random_anchors(model, TARGETS[targets], projector, a.topk)
                cfg = LoraConfig(r=a.rank, lora_alpha=4 * a.rank, target_modules=TARGETS[targets], task_type="CAUSAL_LM",
                                 init_lora_weights=False)
                pm = get_peft_model(model, cfg).to(a.device)
                bindings = bind_anchors(find_lora_targets(pm), anchors)

                def run(batched: bool, bindings: Any = bindings) -> float:
                    anchored_penalty(bindings, True, batched=batched).backward()  # type: ignore[union-attr]
                    sync()
                    t = time.perf_counter()
                    for _ in range(a.reps):
                        anchored_penalty(bindings, True, batched=batched).backward()  # type: ignore[union-attr]
                    sync()
                    return (time.perf_counter() - t) / a.reps

                loop, batched = [], []
                for _ in range(a.repeats):
                    loop.append(run(False))
                    batched.append(run(True))
                key = f"{targets}/{projector}"
                results[key] = {"modules": len(bindings), "loop_ms_min": 1000 * min(loop), "loop_ms_median": 1000 * statistics.median(loop),
                                "batched_ms_min": 1000 * min(batched), "batched_ms_median": 1000 * statistics.median(batched),
                                "speedup_median": statistics.median(loop) / statistics.median(batched)}
                del pm, model
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\nAsFT penalty forward + backward, {a.model} layout, LoRA r={a.rank}, {dev}; {a.repeats} interleaved timings of {a.reps} calls")
    print("| targets/projector | modules | loop ms (min / median) | batched ms (min / median) | speedup (median) |")
    print("| --- | --- | --- | --- | --- |")
    for key, r in results.items():
        print(f"| {key} | {r['modules']} | {r['loop_ms_min']:.2f} / {r['loop_ms_median']:.2f} | "
              f"{r['batched_ms_min']:.2f} / {r['batched_ms_median']:.2f} | {r['speedup_median']:.2f}x |")
    payload = {"command": "python benchmarks/bench_asft_penalty.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, "device": dev},
               "settings": vars(a), "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_asft_penalty{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
