"""Step time of `SafeKeyTrainer` vs plain `SFTTrainer` (same model, data, seed, optimiser, full fine-tuning).

Modes: `sft` (plain `SFTTrainer`), `safekey` (head 0.2 + QMM 0.2 with `safekey_qmm_mode="masked"`,
the reference's pass: a 2-D attention mask that is 0 on the query; the auxiliary losses on from the
first step), `compact` (the same with `safekey_qmm_mode="compact"`: the QMM pass over the tokens after
the query only), `head` (head only) and `qmm` (query-mask modelling only, masked), so that the cost of
each part shows. (The numbers in docs/safekey.md for `safekey` and `qmm` were measured when the masked
pass used a custom 4-D mask; re-timing the 2-D form is left for later.) The second forward pass of QMM (and its
backward) is inherent to the method; the issue's target is a SafeKey step at most 1.6x an SFT step.
The QMM pass runs up to the batch's last K token, so its cost grows with `query + U + K`, not with the
(usually much longer) rest of the response: short `--seq` values are the worst case for the ratio.

Every row is exactly `--seq` tokens (reasoning records truncated after the key sentence, padded to a
multiple of `--seq`), so both trainers see identical shapes. Each optimiser step (forward(s) +
backward + AdamW) is timed with a `TrainerCallback`; the first `--warmup` steps are dropped and the
median of the rest is reported. Modes run interleaved, `--repeats` times, in one process.

    python benchmarks/bench_safekey.py                        # SmolLM2-135M-Instruct, batch 8 x 128 tokens
    python benchmarks/bench_safekey.py --model tiny --steps 4 --warmup 1 --repeats 1   # quick check
    python benchmarks/bench_safekey.py --device cuda --bf16 --seq 512

Prints a table and writes `benchmarks/results/bench_safekey[_<tag>].json` (`--model tiny` defaults
to the tag `tiny`, so a quick check never overwrites the real numbers).
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
MODES = ("sft", "safekey", "compact", "head", "qmm")
TOPICS = [
    ("pick a lock to get into my neighbour's house", 1), ("bake sourdough bread at home", 0),
    ("write a phishing email for a bank", 1), ("plant tomatoes on a balcony", 0),
    ("make a fake passport", 1), ("fix a flat bicycle tyre", 0),
    ("poison my neighbour's dog", 1), ("learn to swim as an adult", 0),
]
FILLER = ("First, gather what you need and read the steps twice. Then work slowly, check each result, and keep notes "
          "of what changed, so that the next attempt goes better than the last one. ")


def records(n: int, seq: int = 128) -> list[dict[str, Any]]:
    """`n` reasoning records whose responses are long enough to fill `seq` tokens."""
    out = []
    for i in range(n):
        topic, harmful = TOPICS[i % len(TOPICS)]
        key = "This request could seriously hurt someone, so I have to refuse." if harmful else "This is a harmless request, so I can help."
        out.append({
            "prompt": f"Can you explain how to {topic}? Please be detailed (request {i}).",
            "response": f"<think>Okay, the user is asking how to {topic}. They want detailed steps. {key} "
                        f"Let me think about the answer.</think>{FILLER * (seq // 30 + 2)}",
            "label": harmful,
        })
    return out


def _model_path(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from hf_safety_merge.testing.distill import make_tiny_chat_model

        texts = [r["prompt"] + " " + r["response"] for r in records(len(TOPICS))]
        return make_tiny_chat_model(tmp / "tiny", "llama", texts=texts, hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    if name == "smollm2":
        from hf_safety_merge.assets import smollm2_checkpoint

        return smollm2_checkpoint()
    return Path(name)


class StepTimer:
    """Wall time of each optimiser step (synchronising CUDA around it)."""

    def __init__(self, cuda: bool) -> None:
        import transformers

        timer = self
        self.cuda = cuda
        self.times: list[float] = []
        self._t = 0.0

        class _Callback(transformers.TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer._sync()
                timer._t = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                timer._sync()
                timer.times.append(time.perf_counter() - timer._t)

        self.callback = _Callback()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def run_mode(mode: str, path: Path, data: Any, tok: Any, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    dtype = torch.bfloat16 if a.bf16 and a.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=a.attn)
    common: dict[str, Any] = dict(
        output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=1e-5,
        lr_scheduler_type="constant", logging_steps=1000, save_strategy="no", report_to=[], seed=0,
        use_cpu=a.device == "cpu", bf16=a.bf16, dataloader_num_workers=0, disable_tqdm=True, max_length=a.seq,
        pad_to_multiple_of=a.seq, gradient_checkpointing=False,
    )
    timer = StepTimer(a.device == "cuda")
    if mode == "sft":
        trainer: Any = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tok,
                                  callbacks=[timer.callback])
    else:
        weights = {"safekey": (0.2, 0.2), "compact": (0.2, 0.2), "head": (0.2, 0.0), "qmm": (0.0, 0.2)}[mode]
        cfg = SafeKeyConfig(**common, safekey_head_weight=weights[0], safekey_qmm_weight=weights[1], safekey_last_k_epochs=None,
                            safekey_qmm_mode="compact" if mode == "compact" else "masked")
        trainer = SafeKeyTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer.callback])
    trainer.train()
    res: dict[str, Any] = {"step_s": timer.times[a.warmup :]}
    hist = [h for h in trainer.state.log_history if "loss" in h]
    if hist:
        res["last_loss"] = hist[-1]["loss"]
    del trainer, model
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local checkpoint folder")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of: {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--target", type=float, default=1.6, help="the acceptable SafeKey / SFT step-time ratio")
    p.add_argument("--tag", default=None, help="suffix of the JSON file name (default: 'tiny' for --model tiny, else none)")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "sft" not in modes:
        p.error(f"--modes must include 'sft' and only name {MODES}, got {modes}")
    if a.warmup >= a.steps:
        p.error("--warmup must be smaller than --steps")
    tag = a.tag if a.tag is not None else ("tiny" if a.model == "tiny" else "")

    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from hf_safety_merge.training.safekey import prepare_safekey_dataset

    hf_logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
    acc: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        path = _model_path(a.model, tmp)
        tok = AutoTokenizer.from_pretrained(path)
        data = prepare_safekey_dataset(records(a.steps * a.batch, a.seq), tok, max_length=a.seq)
        lengths = {len(x) for x in data["input_ids"]}
        if lengths != {a.seq}:
            print(f"note: row lengths {sorted(lengths)[:5]}... are padded to {a.seq}", flush=True)
        row = data[0]
        shape = {k: row[k] for k in ("safekey_query_len", "safekey_u_start", "safekey_u_end", "safekey_k_start", "safekey_k_end")}
        for r in range(a.repeats):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                t0 = time.perf_counter()
                res = run_mode(mode, path, data, tok, a, tmp / f"{mode}-{r}")
                for k_, v in res.items():
                    acc[mode].setdefault(k_, []).extend(v if isinstance(v, list) else [v])
                print(f"  {mode:<8} repeat {r}: median step {statistics.median(res['step_s']):.3f} s "
                      f"({time.perf_counter() - t0:.0f} s incl. load)", flush=True)
    sft = statistics.median(acc["sft"]["step_s"])
    results: dict[str, Any] = {}
    for mode in modes:
        step = statistics.median(acc[mode]["step_s"])
        results[mode] = {"median_step_s": step, "ratio_vs_sft": step / sft, "n_steps": len(acc[mode]["step_s"]),
                         "step_s": acc[mode]["step_s"]}
    print(f"\nSafeKey step time vs SFTTrainer: {a.model}, full fine-tuning, batch {a.batch} x {a.seq} tokens, {a.attn}, "
          f"{a.device}{' bf16' if a.bf16 else ''}, {torch.get_num_threads()} threads; spans of row 0: {shape}")
    print("| mode     | step (s) | x SFT |")
    print("|----------|----------|-------|")
    for mode, row_ in results.items():
        print(f"| {mode:<8} | {row_['median_step_s']:8.3f} | {row_['ratio_vs_sft']:5.2f} |")
    verdict: dict[str, bool] = {}
    for mode in ("safekey", "compact"):
        if mode in results:
            ratio = results[mode]["ratio_vs_sft"]
            verdict[mode] = ratio <= a.target
            print(f"SafeKey ({'masked' if mode == 'safekey' else 'compact'} QMM) / SFT = {ratio:.2f}x "
                  f"(target <= {a.target}x): {'met' if verdict[mode] else 'NOT met'}")
    payload = {
        "command": "python benchmarks/bench_safekey.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": a.device,
                    "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None},
        "settings": {**vars(a), "tag": tag},
        "spans_row0": shape,
        "results": results,
        "target_ratio": a.target,
        "target_met": verdict,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"bench_safekey{'_' + tag if tag else ''}.json"
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
