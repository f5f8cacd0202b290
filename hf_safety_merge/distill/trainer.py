"""`DistillTrainer`: NTK-linearised harmful fine-tuning as a TRL `SFTTrainer` (its args: `DistillConfig`).

The trainer linearises the chosen blocks of the (aligned) model before handing it to
`SFTTrainer`, so everything `SFTTrainer` and `Trainer` do (chat templates, completion-only loss,
logging, checkpointing, gradient accumulation, bf16, `accelerate launch`) applies unchanged. After
training, :meth:`DistillTrainer.safety_vector` returns `theta_aligned - theta_harmful` on the
trained tensors only (`theta_aligned` is the frozen expansion point `theta0`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

import torch
from trl import SFTTrainer

from ..errors import ConfigError
from ..training.sharding import ShardedTrainingMixin
from .config import VECTOR_ROUNDINGS, DistillConfig
from .linearize import (
    LinearizationPlan,
    delta_tensors,
    linearize_model,
    linearized_modules,
    theta0_nbytes,
    unlinearize_model,
)
from .variants import VARIANT_DESCRIPTIONS

logger = logging.getLogger(__name__)

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

    Pass the aligned model (a model object, or a path/Hub id loaded in float32 with
    `args.aligned_revision`, `args.attn_implementation` and `args.model_init_kwargs`) and a harmful
    prompt-completion data set (see :func:`~hf_safety_merge.distill.load_harmful_qa`); the
    linearisation follows `args.distill_*`. Every other argument is `SFTTrainer`'s.

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
        if args.output_dir is None:  # (distill_safety_vector gives a temporary folder instead)
            args = copy.copy(args)
            args.output_dir = "trainer_output"
        self._refuse_early(args)
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            init: dict[str, Any] = dict(args.model_init_kwargs or {})  # type: ignore[arg-type]
            init.setdefault("dtype", torch.float32)
            if args.aligned_revision:
                init.setdefault("revision", args.aligned_revision)
            if args.attn_implementation:
                init.setdefault("attn_implementation", args.attn_implementation)
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
