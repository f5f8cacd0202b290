"""AsFTConfig: `SFTConfig` plus the AsFT regulariser's fields (`--asft_*` flags)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import SFTConfig

from ...errors import ConfigError, did_you_mean
from .projector import PROJECTORS, parse_dtype

logger = logging.getLogger(__name__)


@dataclass
class AsFTConfig(SFTConfig):
    r"""
    Configuration class for the [`AsFTTrainer`]: every [`~trl.SFTConfig`] field, plus the AsFT
    regulariser. Parse it with `TrlParser` like any TRL config (all fields are `--asft_*` flags).

    Parameters:
        > Anchors (where `C_l` comes from)

        asft_anchors_path (`str`, *optional*):
            A safetensors file of anchors (written by `AlignmentAnchors.save`), a folder holding
            `asft_anchors.safetensors`, or a Hub repo id. With `asft_base_model` set it is a local
            cache: computed from `asft_aligned_model` and `asft_base_model` and written there if
            absent (a missing file, or a folder, empty or not, without the anchors file), reused
            only if its recorded aligned / base models, revisions, projector and modules match
            this run (else an error naming the field, or a rebuild with
            `asft_rebuild_stale_anchors`). Without `asft_base_model` the anchors are loaded as
            given (checked against `asft_aligned_model` when that is set).
        asft_rebuild_stale_anchors (`bool`, defaults to `False`):
            Recompute (and overwrite) a cached anchors file that does not match this run, instead
            of stopping with an error.
        asft_aligned_model (`str`, *optional*):
            The aligned (safety-tuned) checkpoint, local path or Hub id. Defaults to the model
            being fine-tuned (AsFT fine-tunes the aligned model itself).
        asft_base_model (`str`, *optional*):
            The unaligned base checkpoint the aligned model was tuned from. Required unless the
            anchors come from `asft_anchors_path`.
        asft_aligned_revision / asft_base_revision (`str`, *optional*):
            Hub revisions of the two checkpoints.

        > Regulariser

        asft_lambda (`float`, defaults to `1.0`):
            Weight of `sum_l ||(I - C_l) B_l A_l||_F^2` in the loss, per optimiser step
            (independent of gradient accumulation and of the number of processes). `0` trains
            exactly like `SFTTrainer` (the penalty is still logged). The reference adds
            `lambda * P` on every micro-batch, i.e. `G * lambda` per step with `G` accumulation
            steps (its scripts use `G = 1`); pass `G * lambda` to reproduce that.
        asft_projector (`str`, defaults to `"safe_lora"`):
            `"safe_lora"`: `C = V V^T / ||V||_F` (the reference; not a projector), or `"topk"`:
            `C = U_k U_k^T` from the SVD of `V`, the projector on its top `asft_projector_rank`
            left singular directions.
        asft_projector_rank (`int`, defaults to `8`):
            `k` of the `"topk"` projector (ignored otherwise).
        asft_include_lora_scaling (`bool`, defaults to `False`):
            Penalise the actual update `s B A` (`s = lora_alpha / r`) instead of `B A`; the
            reference implementation omits `s`.
        asft_target_modules (`list[str]`, *optional*):
            Restrict the penalty to these LoRA modules (names like `q_proj`, suffixes, or full
            regular expressions). Default: every LoRA linear layer of the model.
        asft_anchor_dtype (`str`, defaults to `"float32"`):
            Storage and compute dtype of the anchors (the penalty is computed in this dtype, with
            autocast disabled, even in bf16 training).
        asft_strict (`bool`, defaults to `True`):
            A LoRA module without an anchor is an error; with `False` it is skipped with a warning.

        > Schedule

        asft_lr_decay_per_epoch (`float`, *optional*):
            The AsFT reference's schedule: the learning rate is multiplied by this factor after
            every epoch (`torch.optim.lr_scheduler.StepLR(step_size=1, gamma=...)` stepped once per
            epoch in the reference's `train()`, gamma 0.85), constant within an epoch, no warmup.
            When set it replaces `lr_scheduler_type` (and `warmup_steps`). Default: unset, the
            `lr_scheduler_type` schedule of `SFTConfig`.
    """

    asft_anchors_path: str | None = field(
        default=None,
        metadata={"help": "Cached anchors: a safetensors file (written there if missing and computable), a folder or a Hub repo id."},
    )
    asft_rebuild_stale_anchors: bool = field(
        default=False,
        metadata={"help": "Recompute a cached anchors file that does not match this run (default: error)."},
    )
    asft_aligned_model: str | None = field(
        default=None,
        metadata={"help": "Aligned checkpoint (path or Hub id); defaults to the model being fine-tuned."},
    )
    asft_base_model: str | None = field(
        default=None,
        metadata={"help": "Unaligned base checkpoint (path or Hub id); V = W_aligned - W_base."},
    )
    asft_aligned_revision: str | None = field(default=None, metadata={"help": "Hub revision of the aligned checkpoint."})
    asft_base_revision: str | None = field(default=None, metadata={"help": "Hub revision of the base checkpoint."})
    asft_lambda: float = field(
        default=1.0,
        metadata={"help": "Weight of the off-basin penalty sum ||(I - C) B A||_F^2, per optimiser step."},
    )
    asft_projector: str = field(
        default="safe_lora",
        metadata={"help": "'safe_lora' (C = V V^T / ||V||_F) or 'topk' (rank-k projector from the SVD of V).", "choices": list(PROJECTORS)},
    )
    asft_projector_rank: int = field(default=8, metadata={"help": "k of the 'topk' projector."})
    asft_include_lora_scaling: bool = field(
        default=False,
        metadata={"help": "Penalise s B A with s = lora_alpha / r (the reference omits s)."},
    )
    asft_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "LoRA modules to anchor (names, suffixes or regexes); default: all LoRA linear layers."},
    )
    asft_anchor_dtype: str = field(default="float32", metadata={"help": "dtype of the anchors and of the penalty computation."})
    asft_strict: bool = field(default=True, metadata={"help": "Error when a LoRA module has no anchor (else skip it)."})
    asft_lr_decay_per_epoch: float | None = field(
        default=None,
        metadata={"help": "Multiply the learning rate by this factor after every epoch (the AsFT reference's StepLR, "
                  "gamma 0.85); replaces lr_scheduler_type and warmup."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.asft_projector not in PROJECTORS:
            raise ConfigError(
                f"asft_projector {self.asft_projector!r} is not one of {PROJECTORS}{did_you_mean(self.asft_projector, PROJECTORS)}"
            )
        if self.asft_projector == "topk" and self.asft_projector_rank < 1:
            raise ConfigError(f"asft_projector_rank must be >= 1 for the 'topk' projector, got {self.asft_projector_rank}")
        if not self.asft_lambda >= 0:
            raise ConfigError(f"asft_lambda must be >= 0, got {self.asft_lambda}")
        parse_dtype(self.asft_anchor_dtype, "asft_anchor_dtype")
        if self.asft_lr_decay_per_epoch is not None and not 0 < self.asft_lr_decay_per_epoch <= 1:
            raise ConfigError(f"asft_lr_decay_per_epoch must be in (0, 1], got {self.asft_lr_decay_per_epoch}")
        if isinstance(self.asft_target_modules, str):
            self.asft_target_modules = [m.strip() for m in self.asft_target_modules.split(",") if m.strip()]
