"""Step time of `AsFTTrainer` vs plain `SFTTrainer` (same model, LoRA, data, seed, optimiser).

Each optimiser step (forward + backward + AdamW) is timed with a `TrainerCallback`; the first
`--warmup` steps are dropped and the median of the rest is reported. Modes run interleaved,
`--repeats` times, in one process, so that machine noise hits them alike. Also reported: the
penalty alone (`sum ||(I - C) B A||_F^2`, forward + backward) and the naive dense form it replaces
(`||(I - C) B A||_F^2` forming `B A` and `I - C`), per step.

Anchors come from a random `V` per targeted module (the penalty's cost depends on the shapes only;
SmolLM2-135M's unaligned base is not available offline here).

    python benchmarks/bench_asft.py                       # SmolLM2-135M-Instruct, q/v and all 7 projections
    python benchmarks/bench_asft.py --model tiny --steps 6 --repeats 1   # quick check
    python benchmarks/bench_asft.py --device cuda --bf16
    python benchmarks/bench_asft.py --model path/with/config-and-tokenizer --random-init --device cuda

Prints a table and writes `benchmarks/results/bench_asft[_<tag>].json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = (
    "The library merges a distilled safety vector into a fine-tuned model, then evaluates the unsafe "
    "rate, the over-refusal rate and the task score of the result on held-out prompts. "
)
TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def _model_path(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from hf_safety_merge.testing.distill import make_tiny_chat_model

        return make_tiny_chat_model(tmp / "tiny", "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    if name == "smollm2":
        from hf_safety_merge.assets import smollm2_checkpoint

        return smollm2_checkpoint()
    return Path(name)


def _dataset(tok: Any, n: int, seq: int) -> Any:
    """`n` rows of exactly `seq` tokens each (no padding differences between modes)."""
    from datasets import Dataset

    ids = tok(TEXT * (seq // 8 + 8), add_special_tokens=False)["input_ids"]
    rows = [{"input_ids": ids[i % 7 : i % 7 + seq]} for i in range(n)]
    return Dataset.from_list(rows)


def _random_anchors(model: Any, targets: list[str], projector: str, k: int) -> Any:
    import torch

    from hf_safety_merge.training import AlignmentAnchors, build_anchor
    from hf_safety_merge.training.asft.anchors import module_key

    g = torch.Generator().manual_seed(0)
    anchors = {}
    for name, mod in model.named_modules():
        if name.split(".")[-1] in targets and hasattr(mod, "weight") and mod.weight.ndim == 2:
            v = torch.randn(mod.weight.shape, generator=g) * 0.01
            anchors[module_key(name)] = build_anchor(v, projector, k if projector == "topk" else None)  # type: ignore[arg-type]
    return AlignmentAnchors(anchors, projector, k if projector == "topk" else None)  # type: ignore[arg-type]


class StepTimer:
    def __init__(self) -> None:
        import transformers

        outer = self

        class _CB(transformers.TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer._sync()
                outer._t = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                outer._sync()
                outer.times.append(time.perf_counter() - outer._t)

        self.callback = _CB()
        self.times: list[float] = []
        self._t = 0.0
        self.cuda = False

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def run_mode(mode: str, path: Path, data: Any, tok: Any, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from hf_safety_merge.training import AsFTConfig, AsFTTrainer

    targets = TARGETS[a.targets]
    dtype = torch.bfloat16 if a.bf16 and a.device == "cuda" else torch.float32
    if a.random_init:
        from transformers import AutoConfig

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    common: dict[str, Any] = dict(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=1e-4,
        lr_scheduler_type="constant", logging_steps=1000, save_strategy="no", report_to=[], seed=0,
        use_cpu=a.device == "cpu", bf16=a.bf16, dataloader_num_workers=0, disable_tqdm=True, max_length=a.seq,
        gradient_checkpointing=False,
    )
    peft_cfg = LoraConfig(r=a.rank, lora_alpha=4 * a.rank, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    timer = StepTimer()
    timer.cuda = a.device == "cuda"
    torch.manual_seed(0)
    if mode == "sft":
        trainer: Any = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tok,
                                  peft_config=peft_cfg, callbacks=[timer.callback])
    else:
        projector = mode.split("-", 1)[1]
        anchors = _random_anchors(model, targets, projector, a.topk)
        cfg = AsFTConfig(**common, asft_lambda=1.0, asft_projector=projector, asft_projector_rank=a.topk)
        trainer = AsFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft_cfg,
                              anchors=anchors, callbacks=[timer.callback])
    trainer.train()
    res: dict[str, Any] = {"step_s": timer.times[a.warmup:]}
    if mode != "sft":
        res.update(_penalty_cost(trainer, a))
    del trainer, model
    return res


def _penalty_cost(trainer: Any, a: argparse.Namespace, reps: int = 20) -> dict[str, float]:
    """Seconds per call of the penalty (forward + backward): the cheap form and the naive one."""
    import torch

    from hf_safety_merge.training import naive_offbasin_penalty

    def sync() -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()

    def timeit(fn: Any) -> float:
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t) / reps

    def cheap() -> None:
        trainer.asft_penalty().backward()

    dense = [(b.target, b.anchor_on(b.target.lora_b.device).dense()) for b in trainer.asft_bindings]

    def naive() -> None:
        p = sum(naive_offbasin_penalty(t.lora_b, t.lora_a, c) for t, c in dense)
        p.backward()  # type: ignore[union-attr]

    out = {"penalty_cheap_s": timeit(cheap), "penalty_naive_s": timeit(naive)}
    trainer.model.zero_grad(set_to_none=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local checkpoint folder")
    p.add_argument("--targets", default="qv,all", help="comma list of: qv (the reference), all (7 projections)")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--random-init", action="store_true",
                   help="random weights from the model folder's config.json (same shapes and step time; for machines without the weights)")
    a = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = ["sft", "asft-safe_lora", "asft-topk"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        path = _model_path(a.model, tmp)
        tok = AutoTokenizer.from_pretrained(path)
        data = _dataset(tok, a.steps * a.batch, a.seq)
        for targets in a.targets.split(","):
            a.targets = targets
            acc: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
            for r in range(a.repeats):
                for mode in modes if r % 2 == 0 else modes[::-1]:
                    t0 = time.perf_counter()
                    res = run_mode(mode, path, data, tok, a, tmp / f"{targets}-{mode}-{r}")
                    for k_, v in res.items():
                        acc[mode].setdefault(k_, []).extend(v if isinstance(v, list) else [v])
                    print(f"  [{targets}] {mode} repeat {r}: median step {statistics.median(res['step_s']):.3f} s "
                          f"({time.perf_counter() - t0:.0f} s incl. load)", flush=True)
            sft = statistics.median(acc["sft"]["step_s"])
            for mode in modes:
                step = statistics.median(acc[mode]["step_s"])
                row = {"median_step_s": step, "overhead_vs_sft": step / sft - 1, "n_steps": len(acc[mode]["step_s"])}
                for k_ in ("penalty_cheap_s", "penalty_naive_s"):
                    if k_ in acc[mode]:
                        row[k_] = statistics.median(acc[mode][k_])
                results[f"{targets}/{mode}"] = row
    print(f"\nAsFT step time vs SFTTrainer: {a.model}, LoRA r={a.rank} alpha={4 * a.rank}, batch {a.batch} x {a.seq} tokens, "
          f"{a.device}{' bf16' if a.bf16 else ''}, {torch.get_num_threads()} threads")
    print(f"| {'targets/mode':<22} | step (s) | overhead | penalty fwd+bwd (ms) | naive penalty (ms) |")
    print(f"|{'-' * 24}|----------|----------|----------------------|--------------------|")
    for key, row in results.items():
        pc = f"{1000 * row['penalty_cheap_s']:.2f}" if "penalty_cheap_s" in row else "-"
        pn = f"{1000 * row['penalty_naive_s']:.2f}" if "penalty_naive_s" in row else "-"
        print(f"| {key:<22} | {row['median_step_s']:8.3f} | {100 * row['overhead_vs_sft']:+7.1f}% | {pc:>20} | {pn:>18} |")
    payload = {
        "command": "python benchmarks/bench_asft.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": a.device,
                    "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None},
        "settings": {k_: v for k_, v in vars(a).items() if k_ != "targets"},
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_asft{'_' + a.tag if a.tag else ''}.json"
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
