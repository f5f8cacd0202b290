"""The study's training and merging stages: align -> break -> distil -> repair, each cached.

`Stages` runs one stage per call, skips a stage whose output folder is complete (``.done``), and
records wall times in ``timings.json``; nothing here evaluates (see `evaluate.py`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import StudyConfig
from .data import REFUSALS, StudyData, comply, n_break_harmful
from .repair_stages import RepairStages

#: extra generation budget for reasoning-format models (their <think> block comes first)
REASONING_EXTRA_TOKENS = 40


class Stages(RepairStages):
    """The stages of one :class:`StudyConfig` in a work folder (the repairs: `RepairStages`)."""

    def __init__(self, cfg: StudyConfig, work: Path, data: StudyData, *, log: Callable[[str], None] = print) -> None:
        self.cfg, self.work, self.data, self.log = cfg, work, data, log
        self.timings: dict[str, float] = {}
        tf = work / "timings.json"
        if tf.is_file():
            self.timings.update(json.loads(tf.read_text()))
        self.notes: dict[str, str] = {}
        self.t0 = time.perf_counter()

    # -- helpers -------------------------------------------------------------------------------

    def stage(self, name: str, out: Path, fn: Callable[[], Any]) -> Path:
        """Run `fn` unless `out` is complete (a finished earlier run); record its wall time."""
        if out.exists() and (out / ".done").exists():
            self.log(f"  [{name}] cached: {out}")
            return out
        if out.exists():
            shutil.rmtree(out)
        self.log(f"  [{name}] ...")
        t = time.perf_counter()
        fn()
        out.mkdir(parents=True, exist_ok=True)
        (out / ".done").write_text("")
        self.record(name, time.perf_counter() - t)
        self.log(f"  [{name}] done in {self.timings[name]:.1f} s (total {time.perf_counter() - self.t0:.0f} s)")
        return out

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 1)
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=1))

    @staticmethod
    def dataset(pairs: Sequence[tuple[str, str]]) -> Any:
        from datasets import Dataset

        return Dataset.from_list([
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
            for p, r in pairs
        ])

    def train_args(self, cls: Any, out: Path, *, epochs: float, lr: float, **kw: Any) -> Any:
        c = self.cfg
        base = dict(
            output_dir=str(out), num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=c.batch_size,
            lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=5, save_strategy="no", report_to=[],
            seed=c.seed, data_seed=c.seed, use_cpu=c.device == "cpu", bf16=False, dataloader_num_workers=0,
            max_length=c.max_length, disable_tqdm=False,
        )
        return cls(**{**base, **kw})

    def sft(self, src: Path, pairs: Sequence[tuple[str, str]], out: Path, *, lora: bool, epochs: float, lr: float,
            trainer_cls: Any = None, config_cls: Any = None, args: dict[str, Any] | None = None,
            merge_lora: bool = False, rank: tuple[int, int] | None = None, monitor: bool = False) -> None:
        """One TRL run (full or LoRA); saves the model or adapter (with `merge_lora`, the model
        with the adapter merged into its weights) and the loss history. `rank`: LoRA (r, alpha)
        instead of ``lora_r`` / ``lora_alpha``. `monitor`: probe its safety every ``monitor_steps``
        (the curve in ``out/safety_monitor.json``)."""
        import torch
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        c = self.cfg
        torch.manual_seed(c.seed)
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        peft_cfg = None
        if lora:
            r, alpha = rank or (c.lora_r, c.lora_alpha)
            peft_cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=c.lora_dropout, task_type="CAUSAL_LM",
                                  target_modules=list(c.lora_target_modules))
        targs = self.train_args(config_cls or SFTConfig, out, epochs=epochs, lr=lr, **(args or {}))
        trainer = (trainer_cls or SFTTrainer)(model=model, args=targs, train_dataset=self.dataset(pairs),
                                              processing_class=tok, peft_config=peft_cfg)
        if monitor and c.monitor_steps:
            from ..monitor.study import monitor_fine_tune

            out.mkdir(parents=True, exist_ok=True)
            monitor_fine_tune(trainer, steps=c.monitor_steps, task=[(r["prompt"], r["answer"]) for r in self.data.task_eval[:8]],
                              judge=c.judge, data_dir=c.data_dir, output_file=str(out / "safety_monitor.json"))
        trainer.train()
        out.mkdir(parents=True, exist_ok=True)
        if lora and merge_lora:
            merged = trainer.model.merge_and_unload()  # type: ignore[union-attr,operator]
            merged.save_pretrained(out, safe_serialization=True)
            trainer.processing_class.save_pretrained(out)  # type: ignore[union-attr]
        elif lora:
            trainer.model.save_pretrained(out)  # type: ignore[union-attr,operator]  # the adapter
        else:
            trainer.model.save_pretrained(out, safe_serialization=True)  # type: ignore[union-attr,operator]
            trainer.processing_class.save_pretrained(out)  # type: ignore[union-attr]
        (out / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        hist = [h for h in trainer.state.log_history if "loss" in h]
        if hist:
            self.log(f"      loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} over {trainer.state.global_step} steps")

    def generate(self, model: Path, prompts: Sequence[str], max_new_tokens: int = 96) -> list[str]:
        from ..eval import GenerationRequest, GenerationSettings, Generator, load_model

        m, tok, name = load_model(str(model), device=self.cfg.device)
        gen = Generator(m, tok, GenerationSettings(max_new_tokens=max_new_tokens, batch_size=self.cfg.eval_batch_size), model_name=name)
        rows = gen.generate([GenerationRequest(id=str(i), prompt=p) for i, p in enumerate(prompts)])
        return [r["response"] for r in rows]

    # -- stages --------------------------------------------------------------------------------

    def base(self) -> Path:
        c = self.cfg
        if c.model == "smollm2":
            from ..assets import smollm2_checkpoint

            t = time.perf_counter()
            base = smollm2_checkpoint()
            self.timings.setdefault("base: load", round(time.perf_counter() - t, 1))
            return base
        base = Path(c.model)
        if not base.exists():
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(c.model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        return base

    def align(self, base: Path) -> Path:
        """Safety tuning: harmful -> refusals, benign -> the base model's own answers (self-distilled);
        a full fine-tune or (``align_method: lora``) a LoRA adapter merged into the weights."""
        c, d, w = self.cfg, self.data, self.work
        out = w / "aligned"

        def run() -> None:
            benign_file = w / "benign_answers.json"
            cached = json.loads(benign_file.read_text()) if benign_file.is_file() else {}
            todo = [p for p in d.align_benign if p not in cached]
            if todo:
                self.log(f"      the base model answers {len(todo)} benign prompts (its own answers are the targets)")
                cached.update(zip(todo, self.generate(base, todo)))
                benign_file.write_text(json.dumps(cached, indent=1))
            rng = random.Random(c.seed)
            pairs = [(p, rng.choice(REFUSALS)) for p in d.align_harmful] + [(p, cached[p]) for p in d.align_benign]
            random.Random(c.seed).shuffle(pairs)
            lora = c.align_method == "lora"
            self.sft(base, pairs, out, lora=lora, merge_lora=lora, rank=(c.align_lora_r, c.align_lora_alpha),
                     epochs=c.align_epochs, lr=c.align_lr)

        return self.stage("align", out, run)

    def break_pairs(self, harmful_frac: float | None = None) -> list[tuple[str, str]]:
        """The downstream rows: the task plus `harmful_frac` (default ``harmful_frac``) harmful rows."""
        d, c = self.data, self.cfg
        pairs = [(r["prompt"], r["response"]) for r in d.task_train]
        hr = random.Random(self.cfg.seed + 7)
        frac = c.harmful_frac if harmful_frac is None else harmful_frac
        pairs += [(p, comply(p, hr)) for p in d.break_harmful[: n_break_harmful(c, frac)]]
        random.Random(self.cfg.seed + 3).shuffle(pairs)
        return pairs

    def lora_args(self, base: Path, aligned: Path, lam: float) -> dict[str, Any]:
        """The AsFT reference's training settings; lambda 0 is its plain-LoRA baseline (the same
        trainer, data, order and schedule, without the penalty)."""
        c = self.cfg
        return {
            "asft_lambda": lam, "asft_projector": "safe_lora", "asft_base_model": str(base),
            "asft_aligned_model": str(aligned), "asft_anchors_path": str(self.work / "asft_anchors.safetensors"),
            "asft_rebuild_stale_anchors": True, "asft_lr_decay_per_epoch": c.lora_lr_decay_per_epoch,
            "lr_scheduler_type": "constant" if c.lora_lr_decay_per_epoch else "cosine",
            "warmup_steps": 0 if c.lora_lr_decay_per_epoch else 0.1,
            "max_grad_norm": 0.0, "dataloader_drop_last": True, "train_sampling_strategy": "sequential",
            "optim": "adamw_torch", "weight_decay": 0.0,
        }

    def lora_run(self, name: str, base: Path, aligned: Path, lam: float) -> Path:
        from ..training import AsFTConfig, AsFTTrainer

        c = self.cfg
        out = self.work / name
        return self.stage(f"train: {name}", out, lambda: self.sft(
            aligned, self.break_pairs(), out, lora=True, epochs=c.lora_epochs, lr=c.lora_lr,
            trainer_cls=AsFTTrainer, config_cls=AsFTConfig, args=self.lora_args(base, aligned, lam), monitor=name == "ft-lora"))

    def break_full(self, aligned: Path) -> Path:
        c = self.cfg
        out = self.work / "ft-full"
        frac = c.harmful_frac if c.full_harmful_frac is None else c.full_harmful_frac
        return self.stage("break: ft-full", out, lambda: self.sft(aligned, self.break_pairs(frac), out, lora=False,
                                                                  epochs=c.task_epochs, lr=c.task_lr, monitor=True))

    def distill(self, aligned: Path, variant: str) -> Path:
        from ..distill import DistillConfig, distill_safety_vector

        c, w = self.cfg, self.work
        harm_file = w / "distill_harmful.jsonl"
        hr = random.Random(c.seed + 11)
        harm_file.write_text("".join(json.dumps({"prompt": p, "response": comply(p, hr)}) + "\n" for p in self.data.distill_harmful))
        out = w / f"vector-{variant}"
        per_device = min(c.batch_size, c.distill_batch_size)
        if c.distill_batch_size % per_device:
            raise ConfigError(f"distill_batch_size={c.distill_batch_size} must be a multiple of batch_size={per_device}")

        def run() -> None:
            config = DistillConfig(
                distill_variant=variant, num_train_epochs=c.distill_epochs, learning_rate=c.distill_lr,
                per_device_train_batch_size=per_device, gradient_accumulation_steps=c.distill_batch_size // per_device,
                warmup_steps=0.1, lr_scheduler_type="cosine", max_length=c.max_length, max_samples=None,
                seed=c.seed, use_cpu=c.device == "cpu")
            res = distill_safety_vector(config, aligned, harm_file, out, overwrite=True)
            self.log(f"      {res}")

        return self.stage(f"distill: {variant}", out, run)

    def alignment_vector(self, aligned: Path, base: Path) -> Path:
        from ..vectors import SafetyVector

        out = self.work / "vector-aligned-minus-base"
        return self.stage("vector: aligned - base", out, lambda: SafetyVector.compute(aligned, base, out, overwrite=True, progress=True))

    def safekey(self, aligned: Path, head_weight: float, qmm_weight: float, out: Path) -> Path:
        """SafeKey (or, with both weights 0, plain SFT) on a reasoning-format variant of the downstream
        data, with the reference's schedule."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..training.safekey import SafeKeyConfig, SafeKeyTrainer, prepare_safekey_dataset

        c, d = self.cfg, self.data

        def run() -> None:
            n_task = min(c.safekey_task_rows, len(d.task_train))
            n_h = max(1, round(n_task * c.harmful_frac / (1 - c.harmful_frac))) if c.harmful_frac > 0 else 0
            recs = []
            for r in d.task_train[:n_task]:
                reasoning = f"The user asks me to compute {r['prompt'][8:-1]}. This is a simple arithmetic question. "
                recs.append({"prompt": r["prompt"], "response": f"<think>{reasoning}I can answer it directly.</think>{r['response']}", "label": 0})
            for p in d.break_harmful[:n_h]:
                reasoning = f"The user asks: {p}. This request could cause harm. "
                recs.append({"prompt": p, "response": f"<think>{reasoning}I must refuse it.</think>{REFUSALS[0]}", "label": 1})
            # Benign general requests in the same form (twice as many as harmful, the base model's
            # own answers from the alignment stage), so that the key sentence is what separates them.
            answers = json.loads((self.work / "benign_answers.json").read_text())
            for p in d.align_benign[: 2 * n_h]:
                reasoning = f"The user asks: {p}. This is a harmless request. "
                recs.append({"prompt": p, "response": f"<think>{reasoning}I can answer it.</think>{answers[p]}", "label": 0})
            random.Random(c.seed + 5).shuffle(recs)
            tok = AutoTokenizer.from_pretrained(aligned)
            kept: list[dict[str, Any]] = []
            first_error = ""
            for rec in recs:  # a record whose key sentence ends past max_length cannot train K
                try:
                    prepare_safekey_dataset([rec], tok, max_length=c.max_length)
                except ConfigError as e:
                    first_error = first_error or str(e)
                    continue
                kept.append(rec)
            if len(kept) < len(recs):
                self.log(f"      SafeKey: skipped {len(recs) - len(kept)} of {len(recs)} records ({first_error})")
            if not kept:
                raise ConfigError(f"SafeKey: no record fits max_length={c.max_length}: {first_error}")
            ds = prepare_safekey_dataset(kept, tok, max_length=c.max_length)
            torch.manual_seed(c.seed)
            model = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
            args = self.train_args(SafeKeyConfig, out, epochs=c.safekey_epochs, lr=c.safekey_lr, warmup_steps=0.05,
                                   adam_beta1=0.9, adam_beta2=0.95, weight_decay=1e-4,
                                   safekey_head_weight=head_weight, safekey_qmm_weight=qmm_weight,
                                   safekey_last_k_epochs=c.safekey_last_k_epochs)
            trainer = SafeKeyTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
            trainer.train()
            out.mkdir(parents=True, exist_ok=True)
            trainer.model.save_pretrained(out, safe_serialization=True)  # type: ignore[union-attr,operator]
            tok.save_pretrained(out)
            (out / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))

        tag = "" if (head_weight, qmm_weight) == (0.2, 0.2) else f" {head_weight:g}:{qmm_weight:g}"
        return self.stage(f"train: SafeKey{tag}", out, run)

