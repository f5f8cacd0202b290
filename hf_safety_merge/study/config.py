"""`StudyConfig`: what the safety-transfer study runs, its presets and their validation."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from ..errors import ConfigError, did_you_mean
from ..validation import NonNegativeInt, PositiveFloat, PositiveInt, load_yaml, validate_dataclass

#: method families the study can run (``methods``)
METHODS = ("enchtable", "calibrated", "repair", "resta", "safe_lora", "ties", "dare", "asft", "safekey")
#: EnchTable distillation variants of the reference (docs/distillation.md)
VARIANTS = ("attn", "ffn", "attn_ffn", "attn_block", "attn_block_ffn")
#: the rows the ``full`` preset evaluates in full: the ones each paper's verdict rests on
FULL_HEADLINE_ROWS = ("aligned", "ft-full", "ft-full+enchtable-attn", "ft-full+enchtable-ffn", "ft-full+repair", "ft-lora",
                      "ft-lora+safe_lora", "ft-lora+repair", "asft", "sft-reasoning", "safekey")
#: what the ``repair`` rows search by default (`hf_safety_merge.calibrate.repair`; any registered
#: method with a scale may be named)
REPAIR_METHODS = ("enchtable", "resta", "safe_lora", "ties", "dare")
#: the methods a study runs unless told: all but ``calibrated`` (16 min of the full preset's
#: budget; the calibrated repair has its own benchmark, `benchmarks/bench_calibration.py`)
DEFAULT_METHODS = tuple(m for m in METHODS if m != "calibrated")
UnitFloat = Annotated[float, Field(ge=0, le=1)]


@dataclass
class StudyConfig:
    """What the study runs. Load from YAML/JSON with :meth:`from_file`; presets ``demo`` and ``full``.

    The defaults (the ``full`` preset, which adds ``headline_rows=FULL_HEADLINE_ROWS``) follow the
    reference scripts, scaled only where 2 CPU cores force it; docs/study.md has the table (stage |
    reference | ours | why).

    Attributes:
        model: the unaligned starting model: ``smollm2`` (the embedded SmolLM2-135M-Instruct), a
            local folder or a Hub id.
        data_dir: the public data (AdvBench, Do-Not-Answer, XSTest, DAN); default
            ``$HF_SAFETY_DATA_DIR`` or ``../shared/data``.
        seed / device / threads: one seed for splits and training; ``cpu`` or ``cuda``; torch CPU
            threads (0: torch's default).
        align_harmful / align_benign / align_epochs / align_lr: the safety tuning that makes the
            aligned reference (harmful AdvBench prompts -> refusals, benign prompts -> the base
            model's own answers).
        align_method / align_lora_r / align_lora_alpha: ``lora`` (default) trains a LoRA adapter on
            ``lora_target_modules`` and merges it, so ``V = W_aligned - W_base`` has rank <= r and
            AsFT's ``C`` has eigenvalues near 1 (a full fine-tune spreads V over many directions:
            docs/study.md, "Alignment geometry"); ``full`` fine-tunes every weight.
        task_train / harmful_frac: downstream rows (arithmetic) and the share of harmful rows
            mixed in (0.1: the AsFT reference's 900 benign + 100 harmful).
        full_harmful_frac: the full fine-tune's share of harmful rows (0: the EnchTable paper's
            regime, fine-tunes on benign task data whose safety loss is a side effect; None: the
            same as ``harmful_frac``). The LoRA fine-tunes (AsFT's regime) use ``harmful_frac``.
        break_modes: ``full`` and/or ``lora`` downstream fine-tunes of the aligned model.
        task_epochs / task_lr: the full fine-tune.
        lora_*: the LoRA fine-tune, which is also AsFT's plain-LoRA baseline (the AsFT reference's
            ``q_proj``/``v_proj``, r 8, alpha 32, dropout 0.05, lr 5e-5, per-epoch decay 0.85).
        batch_size / max_length: every training run's batch and cut-off.
        distill_harmful / distill_epochs / distill_lr / distill_batch_size / distill_variants:
            EnchTable's distillation (reference: 1000 rows, 4 epochs, lr 1e-5, cosine, warmup 0.1,
            16 sequences per step).
        enchtable_betas: headline betas (0.1: the paper's); sweep_enchtable_betas on
            ``sweep_variant``.
        resta_betas / sweep_resta_betas: RESTA's scale (1.0 in its scripts).
        safe_lora_sweep: add Safe LoRA projecting every matrix (its default projects 10).
        asft_lambdas / sweep_asft_lambdas: AsFT's lambda (1: the reference's).
        safekey_*: SafeKey and its SFT ablation (reference: 5 epochs, auxiliary losses in the
            last 2, lr 1e-5, AdamW betas (0.9, 0.95), weight decay 1e-4, cosine, warmup 0.05).
        repair_methods / repair_probes / repair_max_over_refusal_increase: the ``repair`` rows (the
            repair a user would ship: `hf_safety_merge.calibrate.repair` searches these methods x
            scale on the calibration prompts, constraint-first, at most ``repair_probes`` per
            method; EnchTable with every distilled vector, Safe LoRA with the alignment vector).
            ``repair_ranges``: the search range per method (default: each method class's `scale`, `calibrate.scales()`).
            ``repair_max_utility_drop``: the repair's utility constraint, the allowed drop of the
            task score (a hard constraint, checked paired like the over-refusal rise) on
            ``calibration_prompts`` arithmetic problems of their own (disjoint from the training and
            evaluation problems); None: no utility constraint (the demo preset).
            ``repair_confidence``: the one-sided confidence of those checks (the library's 0.9 by
            default; the full preset 0.8: on 48 calibration prompts a single extra refusal has a
            90% bound of 6.7 points, over the 5-point budget, so at 0.9 only settings that refuse
            no extra prompt could be kept; at 0.8 one may (at 0.85 not), docs/study.md).
        monitor_steps: probe the full and the LoRA fine-tune's safety every this many steps while
            they train (`hf_safety_merge.monitor`, warn policy; 0: off; the full preset: 10); the
            curves go into study.md ("When is safety lost?") and ``report/monitor_curves.png``.
        calibration_prompts / calibration_max_unsafe / calibration_probes: the ``calibrated``
            repair (EnchTable with beta chosen on prompts no other stage uses). The prompts are
            set aside whenever ``calibration_prompts`` > 0, with or without ``calibrated`` in
            ``methods``, so that adding or dropping the calibrated rows changes no other split.
        eval_harmful / eval_harmful_ood / eval_benign / eval_task / eval_attack: the headline
            evaluation: held-out AdvBench (in distribution), Do-Not-Answer (used by no stage),
            XSTest-safe (over-refusal), task problems, and AdvBench prompts under each attack.
        sweep_eval_harmful / sweep_eval_benign / sweep_eval_task: the smaller evaluation of sweep
            rows (the first prompts of the headline AdvBench, XSTest-safe and task sets; no attacks).
        max_new_tokens / eval_batch_size: generation settings.
        eval_workers: rows evaluated at once, each in its own process with ``threads //
            eval_workers`` torch threads (0: 2 on a CPU with >= 2 threads, else 1; 1: in this
            process). Exact up to floating-point rounding (a different thread count sums in
            another order, which can flip a near-tie in greedy decoding).
        judge: the harm and refusal judge (``auto``: the learned judge, docs/evaluation.md).
        backend: where the evaluation generates: ``auto`` (default: a managed vLLM server when a
            vLLM environment is found, ``vllm_python`` or ``$HF_SAFETY_VLLM_PYTHON``, else
            transformers), ``transformers`` or ``vllm`` (docs/evaluation.md, "Serving engines").
            With vLLM, rows are evaluated one at a time (the server batches every request) and
            one server serves every row, the weights reloaded between rows.
        vllm_python: vLLM's python or virtual environment folder (None: ``$HF_SAFETY_VLLM_PYTHON``).
        headline_rows: the rows that get the full (headline) evaluation and are built, evaluated and
            reported first; every other row gets the sweep evaluation after them. Empty: every row
            of the headline plan.
        methods: which method families run (``METHODS``; default ``DEFAULT_METHODS``, all but
            ``calibrated``, which adds two calibrated repairs, 16 min on 2 CPU cores).
    """

    model: str = "smollm2"
    data_dir: str | None = None
    seed: NonNegativeInt = 0
    device: Literal["cpu", "cuda"] = "cpu"
    threads: NonNegativeInt = 0
    align_harmful: PositiveInt = 144
    align_benign: PositiveInt = 288
    align_epochs: PositiveFloat = 1.0
    align_lr: PositiveFloat = 1e-3
    align_method: Literal["full", "lora"] = "lora"
    align_lora_r: PositiveInt = 8
    align_lora_alpha: PositiveInt = 32
    task_train: PositiveInt = 900
    harmful_frac: Annotated[float, Field(ge=0, lt=1)] = 0.1
    full_harmful_frac: Annotated[float, Field(ge=0, lt=1)] | None = 0.0
    break_modes: Sequence[Literal["full", "lora"]] = ("full", "lora")
    task_epochs: PositiveFloat = 1.0
    task_lr: PositiveFloat = 5e-5
    lora_epochs: PositiveFloat = 1.0
    lora_lr: PositiveFloat = 5e-5
    lora_r: PositiveInt = 8
    lora_alpha: PositiveInt = 32
    lora_dropout: UnitFloat = 0.05
    lora_target_modules: Sequence[str] = ("q_proj", "v_proj")
    lora_lr_decay_per_epoch: Annotated[float, Field(gt=0, le=1)] | None = 0.85
    batch_size: PositiveInt = 8
    max_length: PositiveInt = 160
    distill_harmful: PositiveInt = 128
    distill_epochs: PositiveFloat = 4.0
    distill_lr: PositiveFloat = 1e-5
    distill_batch_size: PositiveInt = 16
    distill_variants: Sequence[Literal["attn", "ffn", "attn_ffn", "attn_block", "attn_block_ffn"]] = ("attn",)
    enchtable_betas: Sequence[PositiveFloat] = (0.1,)
    sweep_variant: Literal["attn", "ffn", "attn_ffn", "attn_block", "attn_block_ffn"] = "attn"
    sweep_enchtable_betas: Sequence[PositiveFloat] = (0.05, 0.2, 0.5, 1.0)
    resta_betas: Sequence[PositiveFloat] = (1.0,)
    sweep_resta_betas: Sequence[PositiveFloat] = (0.25, 0.5)
    safe_lora_sweep: bool = True
    asft_lambdas: Sequence[Annotated[float, Field(ge=0)]] = (1.0,)
    sweep_asft_lambdas: Sequence[Annotated[float, Field(ge=0)]] = (0.1, 10.0)
    safekey_task_rows: PositiveInt = 48
    safekey_epochs: PositiveFloat = 5.0
    safekey_last_k_epochs: PositiveFloat = 2.0
    safekey_lr: PositiveFloat = 1e-5
    safekey_settings: Sequence[str] = ("0.2:0.2", "0:0")
    repair_methods: Sequence[str] = REPAIR_METHODS
    repair_probes: Annotated[int, Field(ge=2, le=64)] = 3
    repair_max_over_refusal_increase: UnitFloat = 0.05
    repair_max_utility_drop: UnitFloat | None = None
    repair_confidence: Annotated[float, Field(ge=0.5, lt=1)] = 0.9
    repair_ranges: dict[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    monitor_steps: NonNegativeInt = 0
    calibration_prompts: NonNegativeInt = 48
    calibration_max_unsafe: UnitFloat = 0.05
    calibration_probes: Annotated[int, Field(ge=2, le=64)] = 8
    eval_harmful: PositiveInt = 100
    eval_harmful_ood: NonNegativeInt = 50
    eval_benign: PositiveInt = 125
    eval_task: PositiveInt = 150
    eval_attack: NonNegativeInt = 100
    attacks: Sequence[str] = ("dan", "prefill")
    sweep_eval_harmful: PositiveInt = 40
    sweep_eval_benign: PositiveInt = 40
    sweep_eval_task: PositiveInt = 40
    max_new_tokens: PositiveInt = 48
    eval_batch_size: PositiveInt = 16
    eval_workers: NonNegativeInt = 0
    judge: str = "auto"
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    vllm_python: str | None = None
    methods: Sequence[str] = DEFAULT_METHODS
    headline_rows: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> StudyConfig:
        """``full``: the study in the papers' regimes (131 min of stage time on 2 CPU cores, measured; docs/study.md "Budget"); ``demo``: the
        headline only (a broken full fine-tune; EnchTable at the paper's beta 0.1, and the recommended
        repair, searched over EnchTable and RESTA on 48 + 48 calibration prompts)."""
        if name == "full":
            cfg = cls(headline_rows=FULL_HEADLINE_ROWS, distill_variants=("attn", "ffn"), monitor_steps=10,
                      repair_max_utility_drop=0.1, repair_confidence=0.8, repair_probes=5)
        elif name == "demo":
            cfg = cls(
                align_harmful=80, align_benign=160, align_epochs=1.0, task_train=360, break_modes=("full",),
                distill_harmful=64, distill_variants=("attn",), sweep_enchtable_betas=(), sweep_resta_betas=(),
                safe_lora_sweep=False, methods=("enchtable", "repair"), repair_methods=("enchtable", "resta"),
                repair_ranges={"enchtable": [0.1, 3.0], "resta": [0.5, 3.0]},
                calibration_prompts=48, eval_harmful=48, eval_harmful_ood=0,
                eval_benign=48, eval_task=48, eval_attack=0, attacks=(), max_new_tokens=40, sweep_eval_harmful=48,
                sweep_eval_benign=48, sweep_eval_task=48,
            )
        else:
            raise ConfigError(f"unknown study preset {name!r}; expected 'demo' or 'full'" + did_you_mean(name, ("demo", "full")))
        return cfg.replace(**overrides)

    def replace(self, **overrides: Any) -> StudyConfig:
        names = {f.name for f in dataclasses.fields(self)}
        for k in overrides:
            if k not in names:
                raise ConfigError(f"unknown study option {k!r}" + did_you_mean(k, names))
        cfg = dataclasses.replace(self, **overrides)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> StudyConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"study config {p} does not exist")
        raw = load_yaml(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of study options, got {type(raw).__name__}")
        preset = raw.pop("preset", "full")
        return cls.preset(preset, **{**raw, **overrides})

    def validate(self) -> None:
        """Types and ranges of every field (strict: YAML strings are not numbers), then the
        entries of the list-valued options and how they fit together."""
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)
        validate_dataclass(self, what="study option")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"study method {m!r} is not one of {METHODS}" + did_you_mean(m, METHODS))
        if not self.break_modes:
            raise ConfigError("break_modes must name at least one of 'full', 'lora'")
        if self.eval_attack not in (0, self.eval_harmful):
            raise ConfigError(f"eval_attack={self.eval_attack} must be 0 or eval_harmful={self.eval_harmful} (attacks wrap every AdvBench eval prompt)")
        for s, h in (("harmful", "harmful"), ("benign", "benign"), ("task", "task")):
            if getattr(self, f"sweep_eval_{s}") > getattr(self, f"eval_{h}"):
                raise ConfigError(f"sweep_eval_{s} must not exceed eval_{h} (sweeps use the first prompts of the headline sets)")
        needs_vector = {"enchtable", "calibrated", "repair", "resta", "ties", "dare"} & set(self.methods)
        if needs_vector and not self.distill_variants:
            raise ConfigError(f"methods {sorted(needs_vector)} need a distilled vector: distill_variants is empty")
        if self.sweep_enchtable_betas and self.sweep_variant not in self.distill_variants:
            raise ConfigError(f"sweep_variant {self.sweep_variant!r} is not in distill_variants {list(self.distill_variants)}")
        if "asft" in self.methods and "lora" not in self.break_modes:
            raise ConfigError("method 'asft' needs break_modes to include 'lora' (its plain-LoRA baseline)")
        for a in self.safekey_settings:
            h, _, q = str(a).partition(":")
            try:
                ok = float(h) >= 0 and float(q) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"safekey_settings entry {a!r}: expected '<head weight>:<qmm weight>', both >= 0")
        for m in ("calibrated", "repair"):
            if m in self.methods and not self.calibration_prompts:
                raise ConfigError(f"method {m!r} needs calibration_prompts > 0 (the prompts its setting is chosen on)")
        from ..calibrate.repair_config import repair_methods
        from ..methods.base import canonical_name

        known = repair_methods()
        for m in self.repair_methods:
            if canonical_name(m) not in known:
                raise ConfigError(f"repair_methods entry {m!r} is not one of {known} (or 'resta')" + did_you_mean(m, known))
        if self.safekey_last_k_epochs > self.safekey_epochs:
            raise ConfigError("safekey_last_k_epochs must be <= safekey_epochs")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
