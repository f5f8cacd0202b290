"""`DistillConfig` / `DistillTrainer`: NTK-linearised harmful fine-tuning as a TRL `SFTTrainer`.

The trainer linearises the chosen blocks of the (aligned) model before handing it to
`SFTTrainer`, so everything `SFTTrainer` and `Trainer` do (chat templates, completion-only loss,
logging, checkpointing, gradient accumulation, bf16, `accelerate launch`) applies unchanged. After
training, :meth:`DistillTrainer.safety_vector` returns `theta_aligned - theta_harmful` on the
trained tensors only (`theta_aligned` is the frozen expansion point `theta0`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from transformers.trainer_utils import SaveStrategy, SchedulerType
from trl import SFTConfig, SFTTrainer

from ..errors import ConfigError, did_you_mean
from ..training.sharding import ShardedTrainingMixin
from ..validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    validate_dataclass,
)
from .linearize import (
    ATTN_NAMES,
    MLP_NAMES,
    VARIANT_DESCRIPTIONS,
    LinearizationPlan,
    delta_tensors,
    linearize_model,
    linearized_modules,
    resolve_variant,
    theta0_nbytes,
    unlinearize_model,
)

logger = logging.getLogger(__name__)

#: `distill_vector_rounding` values: the dtype that `theta_aligned` and `theta_harmful` are each
#: rounded to before the difference (`None`: the difference of the float32 weights as trained)
VECTOR_ROUNDINGS: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16}


@dataclass
class DistillConfig(SFTConfig):
    r"""
    Configuration of the [`DistillTrainer`]: every [`~trl.SFTConfig`] field, plus the
    linearisation. Parse it with `TrlParser`. Defaults that match the EnchTable reference scripts:
    lr 1e-5, cosine schedule, warmup 0.1, 4 epochs, 16 sequences per optimiser step (4 x 4 on one
    device). Defaults that differ, on purpose (see docs/distillation.md, "Reference settings"):
    `max_length` 512 (reference cutoff 2048), fp32 (reference bf16), variant `"ffn"` on all
    layers (reference: `"attn"` on all layers for Llama, `"attn_ffn"` on `[12, L-12)` for
    Qwen/Mistral).

    Parameters:
        distill_variant (`str`, defaults to `"ffn"`):
            Which blocks to train and how. The EnchTable reference's modes: `"ffn"` (each decoder
            layer's MLP block, NTK-linearised), `"attn"` (the attention projections, fine-tuned
            plainly: what the reference's per-`nn.Linear` wrapping amounts to), `"attn_ffn"`
            (both). Extensions: `"attn_block"` (the whole attention block NTK-linearised) and
            `"attn_block_ffn"` (attention and MLP blocks, each linearised on its own; `"hybrid"`
            is its deprecated alias).
        distill_skip_layers (`int`, defaults to `0`):
            `N` trains layers `[N, L - N)` only (EnchTable's layer range).
        distill_layers (`list[int]`, *optional*):
            An explicit half-open layer range `[start, end)`; excludes `distill_skip_layers`.
        distill_mlp_names / distill_attn_names (`list[str]`):
            Child names under which a decoder layer keeps its MLP / attention block.
        distill_vector_rounding (`str`, defaults to `"none"`):
            `"none"`: `Delta_s = theta_aligned - theta_harmful` of the weights as trained.
            `"bf16"`: the EnchTable reference's rounding: `theta_aligned` and `theta_harmful` are
            each rounded to bfloat16 (round to nearest even) and the difference is taken in float32,
            as the reference subtracts its two bf16 checkpoints (DeepSpeed saves the harmful model
            in bf16). An element that moved less than half a bf16 step from a bf16-representable
            aligned weight is then exactly 0. Training itself is unchanged.
    """

    distill_variant: str = field(
        default="ffn",
        metadata={"help": "ffn | attn | attn_ffn (the EnchTable reference's modes) | attn_block | attn_block_ffn (extensions)."},
    )
    distill_skip_layers: int = field(default=0, metadata={"help": "Train layers [N, L-N) only."})
    distill_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit layer range [start, end) (excludes distill_skip_layers)."}
    )
    distill_mlp_names: list[str] = field(
        default_factory=lambda: list(MLP_NAMES), metadata={"help": "Child names of a layer's MLP block."}
    )
    distill_attn_names: list[str] = field(
        default_factory=lambda: list(ATTN_NAMES), metadata={"help": "Child names of a layer's attention block."}
    )
    distill_vector_rounding: str = field(
        default="none",
        metadata={"help": "'none': theta_aligned - theta_harmful as trained; 'bf16': each rounded to bfloat16 before "
                  "the difference (the EnchTable reference's bf16 checkpoints).", "choices": list(VECTOR_ROUNDINGS)},
    )

    # EnchTable's reference hyperparameters (max_length and precision differ on purpose).
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (EnchTable: 1e-5)."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "LR schedule (EnchTable: cosine)."})
    warmup_steps: float = field(
        default=0.1, metadata={"help": "Warmup steps, or a fraction of training steps if < 1 (EnchTable: 0.1)."}
    )
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs (EnchTable: 4)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Sequences per device and micro-batch."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimiser step."})
    max_length: int | None = field(
        default=512, metadata={"help": "Maximum tokens per example (EnchTable's cutoff_len: 2048)."}
    )
    gradient_checkpointing: bool | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing."})
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Activation (gradient) checkpointing; off by default."}
    )
    save_strategy: SaveStrategy | str = field(
        default="no", metadata={"help": "Checkpointing (off by default: no harmful checkpoint is kept)."}
    )
    # (same union order as TrainingArguments: HfArgumentParser relies on it)
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Loggers (none by default)."})  # noqa: RUF036

    def __post_init__(self) -> None:
        # canonical name ('hybrid' -> 'attn_block_ffn', with a FutureWarning); the warning about
        # 'attn''s reference meaning comes from linearize_model
        validate_dataclass(self, what="distill option", names=_OWN_FIELDS, overrides=_CONSTRAINTS)
        self.distill_variant = resolve_variant(self.distill_variant, warn_attn=False)
        if self.distill_layers is not None and (len(self.distill_layers) != 2 or self.distill_layers[0] >= self.distill_layers[1]):
            raise ConfigError(f"distill option 'distill_layers' = {self.distill_layers!r}: expected [start, end) with start < end")
        if self.distill_layers is not None and self.distill_skip_layers:
            raise ConfigError("give either distill_layers or distill_skip_layers, not both")
        if self.distill_vector_rounding not in VECTOR_ROUNDINGS:
            raise ConfigError(
                f"distill option 'distill_vector_rounding' = {self.distill_vector_rounding!r}: expected one of "
                f"{', '.join(map(repr, VECTOR_ROUNDINGS))}{did_you_mean(str(self.distill_vector_rounding), VECTOR_ROUNDINGS)}"
            )
        super().__post_init__()


#: DistillConfig's own fields, checked strictly when it is built (the SFTConfig ones are TRL's)
_OWN_FIELDS = ("distill_variant", "distill_skip_layers", "distill_layers", "distill_mlp_names", "distill_attn_names",
               "distill_vector_rounding",
               "learning_rate", "warmup_steps", "num_train_epochs", "per_device_train_batch_size",
               "gradient_accumulation_steps", "max_length")
_CONSTRAINTS: dict[str, Any] = {
    "distill_skip_layers": NonNegativeInt,
    "distill_layers": list[NonNegativeInt] | None,
    "learning_rate": PositiveFloat,
    "warmup_steps": NonNegativeFloat,
    "num_train_epochs": PositiveFloat,
    "per_device_train_batch_size": PositiveInt,
    "gradient_accumulation_steps": PositiveInt,
    "max_length": PositiveInt | None,
}


def loss_summary(log_history: list[dict[str, Any]], max_points: int = 20) -> dict[str, Any]:
    """First / last / min training loss and a down-sampled `[step, loss]` curve from `log_history`."""
    pts = [(int(e.get("step", 0)), float(e["loss"])) for e in log_history if "loss" in e and isinstance(e["loss"], (int, float))]
    if not pts:
        return {"num_logged": 0}
    stride = max(1, math.ceil(len(pts) / max_points))
    curve = pts[::stride]
    if curve[-1] != pts[-1]:
        curve.append(pts[-1])
    return {
        "num_logged": len(pts),
        "first": round(pts[0][1], 6),
        "last": round(pts[-1][1], 6),
        "min": round(min(p[1] for p in pts), 6),
        "curve": [[s, round(v, 6)] for s, v in curve],
    }


class DistillTrainer(ShardedTrainingMixin, SFTTrainer):
    """`SFTTrainer` that trains an NTK-linearised copy of the chosen blocks.

    Pass the aligned model (a model object or a path/Hub id) and a harmful prompt-completion data
    set (see :func:`~hf_safety_merge.distill.load_harmful_qa`); the linearisation follows
    `args.distill_*`. Every other argument is `SFTTrainer`'s.

    After `train()`: :meth:`safety_vector` gives `theta_aligned - theta_harmful` on the trained
    tensors; :meth:`harmful_model` restores the plain blocks holding `theta_harmful`.
    """

    args: DistillConfig
    sharding_method = "distillation"
    supports_fsdp2 = False  # refused at start-up: torch.func over DTensor shards is not exact here

    def __init__(self, model: Any, args: DistillConfig | None = None, **kwargs: Any) -> None:
        if args is None:
            args = DistillConfig(output_dir="distill-output")
        if not isinstance(args, DistillConfig):
            raise ConfigError(f"DistillTrainer needs a DistillConfig, got {type(args).__name__}")
        self._refuse_early(args)
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            init: dict[str, Any] = dict(args.model_init_kwargs or {})  # type: ignore[arg-type]
            init.setdefault("dtype", torch.float32)
            self.aligned_name: str | None = model
            model = AutoModelForCausalLM.from_pretrained(model, **init)
        else:
            self.aligned_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if any(True for _ in linearized_modules(model)):
            raise ConfigError("the model given to DistillTrainer is already linearised")
        self.linearization: LinearizationPlan = linearize_model(
            model,
            args.distill_variant,
            layers=args.distill_layers,
            skip_layers=args.distill_skip_layers,
            mlp_names=args.distill_mlp_names,
            attn_names=args.distill_attn_names,
        )
        self.train_time_s: float = 0.0
        super().__init__(model=model, args=args, **kwargs)
        self._setup_sharding()  # FSDP and ZeRO-3 are refused here, before any training
        logger.info(
            "linearised %d blocks (%s, layers [%d, %d)): %s trainable parameters of %s; theta0 copy %.1f MB",
            len(self.linearization.blocks),
            self.linearization.variant,
            *self.linearization.layers,
            f"{self.linearization.num_trainable_parameters:,}",
            f"{self.linearization.num_total_parameters:,}",
            theta0_nbytes(model) / 2**20,
        )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.train_time_s += time.perf_counter() - t

    # ------------------------------------------------------------------ results
    def _unwrapped(self) -> torch.nn.Module:
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        assert isinstance(model, torch.nn.Module)
        return model

    def delta(self) -> dict[str, torch.Tensor]:
        """`theta_aligned - theta_harmful` of every trained tensor (float32, CPU), with the
        rounding of `args.distill_vector_rounding` (`"bf16"`: `bf16(theta_aligned) - bf16(theta_harmful)`)."""
        return delta_tensors(self._unwrapped(), sign=-1.0, round_to=VECTOR_ROUNDINGS[self.args.distill_vector_rounding])

    def summary(self) -> dict[str, Any]:
        """What the card records: variant, layers, steps, loss curve summary, time."""
        a = self.args
        world = max(1, a.world_size)
        return {
            "variant": self.linearization.variant,
            "variant_description": VARIANT_DESCRIPTIONS.get(self.linearization.variant, self.linearization.variant),
            "num_linearized_blocks": len(self.linearization.linearized_blocks),
            "layers": list(self.linearization.layers),
            "num_layers": self.linearization.num_layers,
            "num_blocks": len(self.linearization.blocks),
            "trainable_parameters": self.linearization.num_trainable_parameters,
            "steps": int(self.state.global_step),
            "epochs": round(float(self.state.epoch or 0.0), 4),
            "num_samples": len(self.train_dataset) if self.train_dataset is not None else None,  # type: ignore[arg-type]
            "effective_batch_size": a.per_device_train_batch_size * a.gradient_accumulation_steps * world,
            "learning_rate": a.learning_rate,
            "lr_scheduler": str(a.lr_scheduler_type.value if hasattr(a.lr_scheduler_type, "value") else a.lr_scheduler_type),
            "warmup": a.warmup_steps,
            "max_length": a.max_length,
            "bf16": bool(a.bf16),
            "vector_rounding": a.distill_vector_rounding,
            "seed": a.seed,
            "loss": loss_summary(self.state.log_history),
            "train_time_s": round(self.train_time_s, 2),
        }

    def safety_vector(self, *, dataset: str | None = None, extra: dict[str, Any] | None = None) -> Any:
        """The distilled :class:`~hf_safety_merge.SafetyVector` (in memory; `save_pretrained` it)."""
        from .. import __version__
        from ..vectors import SafetyVector, SafetyVectorConfig

        model = self._unwrapped()
        cfg = getattr(model, "config", None)
        info = self.summary()
        if dataset is not None:
            info = {"dataset": dataset, **info}
        info.update(extra or {})
        vc = SafetyVectorConfig(
            architecture=((getattr(cfg, "architectures", None) or [type(model).__name__])[0]),
            model_type=getattr(cfg, "model_type", None),
            aligned_model=self.aligned_name,
            reference_model=(
                f"<aligned model fine-tuned on {dataset or 'harmful data'}, "
                f"{VARIANT_DESCRIPTIONS.get(self.linearization.variant, self.linearization.variant)}; not kept>"
            ),
            method=f"ntk_distilled:{self.linearization.variant}",
            tensor_filter=self.linearization.tensor_filter(),
            library_version=__version__,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            extra=info,
        )
        tensors = self.delta()
        vec = SafetyVector.from_tensors(tensors, vc)
        vec.config.tensor_norms = {n: float(t.double().norm()) for n, t in tensors.items()}
        return vec

    def harmful_model(self) -> torch.nn.Module:
        """Restore the plain blocks (holding the trained `theta_harmful`) and return the model."""
        model = self._unwrapped()
        unlinearize_model(model)
        cfg = getattr(model, "config", None)
        if self.linearization.use_cache_was is not None and cfg is not None:
            cfg.use_cache = self.linearization.use_cache_was
        return model
