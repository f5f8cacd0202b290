"""AsFT under DDP and FSDP2 on 2 processes (gloo on CPU, nccl on GPUs): the penalty's share of a
training step, the bytes the penalty itself sends, and the anchor memory per process.

    python benchmarks/bench_sharded_asft.py [--model smollm2] [--targets qv,all] [--steps 8]

Per engine and target set, one process group of 2 runs interleaved steps with and without the
penalty (forward, backward, SGD step on the LoRA weights; batch `--batch` x `--seq` tokens per
process): the penalty's share is `(median step with - median step without) / median step with`.
The penalty is also timed alone (its forward and backward). Bytes: under DDP the penalty sends
nothing of its own (its gradient rides in DDP's all-reduce of the LoRA gradients, which runs
anyway); under FSDP2 it sends one all_gather (the A rows, the B rows of dense anchors) and one
all_reduce (F^T B of factor anchors) each way, counted by `hf_safety_merge.training.sharding`.
The weights are the model's; the anchors are random with the model's shapes (the cost depends on
shapes only). Prints a table and writes `benchmarks/results/bench_sharded_asft[_<tag>].json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"


def _worker(rank: int, world: int, port: int, a: argparse.Namespace, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from bench_asft import TARGETS, _random_anchors
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_safety_merge.training.asft.peft_mixin import bind_anchors, find_lora_targets
    from hf_safety_merge.training.asft.penalty import anchored_penalty, sharded_penalty_terms
    from hf_safety_merge.training.sharding import COMM_BYTES, apply_fsdp2, reset_comm_bytes

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    lam = 1.0
    try:
        for targets in a.targets.split(","):
            for engine in ("ddp", "fsdp2"):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                anchors = _random_anchors(model, TARGETS[targets], "safe_lora", 8)
                model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                                         target_modules=TARGETS[targets], task_type="CAUSAL_LM"))
                g = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for n, p in sorted(model.named_parameters()):
                        if "lora_B" in n:
                            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
                if engine == "ddp":
                    wrapped: Any = torch.nn.parallel.DistributedDataParallel(model)
                else:
                    apply_fsdp2(model)
                    wrapped = model
                bindings = bind_anchors(find_lora_targets(model), anchors)
                del anchors
                opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                vocab = model.config.vocab_size if hasattr(model, "config") else 1000
                x = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(2 + rank))

                def penalty_fwd_bwd(scale: float, engine: str = engine, bindings: Any = bindings) -> Any:
                    if engine == "ddp":
                        return anchored_penalty(bindings) * scale
                    parts, _ = sharded_penalty_terms(bindings)
                    (torch.stack(parts).sum() * scale).backward()
                    return None

                times: dict[str, list[float]] = {"with": [], "without": [], "penalty_alone": []}
                comm: list[int] = []
                for step in range(a.warmup + a.steps):
                    for mode in (("with", "without") if step % 2 == 0 else ("without", "with")):
                        dist.barrier()
                        reset_comm_bytes()
                        t = time.perf_counter()
                        loss = wrapped(input_ids=x, labels=x).loss
                        if mode == "with":
                            extra = penalty_fwd_bwd(lam)
                            if extra is not None:
                                loss = loss + extra
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        dist.barrier()
                        dt = time.perf_counter() - t
                        if step >= a.warmup:
                            times[mode].append(dt)
                            if mode == "with":
                                comm.append(COMM_BYTES["forward"] + COMM_BYTES["backward"])
                    # the penalty alone, forward and backward
                    dist.barrier()
                    t = time.perf_counter()
                    p = penalty_fwd_bwd(lam)
                    if p is not None:
                        p.backward()
                    dist.barrier()
                    if step >= a.warmup:
                        times["penalty_alone"].append(time.perf_counter() - t)
                    opt.zero_grad(set_to_none=True)
                med = {k: statistics.median(v) for k, v in times.items()}
                anchor_local = sum(b.anchor.matrix.numel() * b.anchor.matrix.element_size() for b in bindings)
                anchor_whole = sum(b.anchor.out_features * b.anchor.matrix.shape[1] * b.anchor.matrix.element_size() for b in bindings)
                lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
                results[f"{targets}/{engine}"] = {
                    "modules": len(bindings),
                    "step_with_s": med["with"],
                    "step_without_s": med["without"],
                    "penalty_alone_s": med["penalty_alone"],
                    "penalty_share": (med["with"] - med["without"]) / med["with"],
                    "penalty_alone_share": med["penalty_alone"] / med["with"],
                    "penalty_bytes_sent_per_step": int(statistics.median(comm)) if engine == "fsdp2" else 0,
                    "lora_grad_bytes": lora_bytes,
                    "anchor_bytes_per_process": anchor_local,
                    "anchor_bytes_whole": anchor_whole,
                    "runs": {k: v for k, v in times.items()},
                }
                del wrapped, model, opt, bindings
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (the real SmolLM2-135M-Instruct), tiny, or a folder")
    p.add_argument("--targets", default="qv,all")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    import torch.multiprocessing as mp
    from bench_asft import _model_path

    with tempfile.TemporaryDirectory() as tmp:
        path = _model_path(a.model, Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        raw = Path(tmp) / "raw.json"
        mp.spawn(_worker, args=(2, port, a, str(path), str(raw)), nprocs=2, join=True)
        results = json.loads(raw.read_text())
    print(f"\nAsFT on 2 processes, {a.model}, LoRA r={a.rank}, batch {a.batch} x {a.seq} tokens per process, "
          f"median of {a.steps} interleaved steps\n")
    print("| targets | engine | modules | step s (with) | step s (without) | penalty share | penalty alone s | "
          "penalty bytes/step | LoRA grad bytes | anchors/process MiB | anchors whole MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, r in results.items():
        t, e = key.split("/")
        print(f"| {t} | {e} | {r['modules']} | {r['step_with_s']:.3f} | {r['step_without_s']:.3f} | {100 * r['penalty_share']:.1f}% | "
              f"{r['penalty_alone_s']:.4f} | {r['penalty_bytes_sent_per_step']:,} | {r['lora_grad_bytes']:,} | "
              f"{r['anchor_bytes_per_process'] / 2**20:.1f} | {r['anchor_bytes_whole'] / 2**20:.1f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_sharded_asft" + (f"_{a.tag}" if a.tag else "") + ".json"
    doc = {
        "command": "python benchmarks/bench_sharded_asft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": a.model, "lora_rank": a.rank, "batch": a.batch, "seq": a.seq, "steps": a.steps, "world_size": 2,
        "results": results,
    }
    (out / name).write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
