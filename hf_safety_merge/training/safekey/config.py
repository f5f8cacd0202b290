"""SafeKeyConfig: `SFTConfig` plus SafeKey's loss weights, schedule and QMM mode (and where the heads are saved)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from trl import SFTConfig

from ...errors import ConfigError, did_you_mean

HEADS_FILE = "safekey_heads.safetensors"
QMM_MODES = ("auto", "masked", "compact")

#: Model types (`config.model_type` of the text model) for which the "compact" QMM pass is tested to
#: give the same K log-probabilities as the "masked" (reference) pass, to 1e-5 on tiny random models
#: with sliding windows of 8, conv and linear-attention layers (tests/test_safekey_qmm.py checks every
#: entry). Other model types use "masked" under `safekey_qmm_mode="auto"`, and refuse "compact".
COMPACT_EXACT_MODEL_TYPES = frozenset({
    "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2", "smollm3", "granite", "lfm2",
    "qwen3_next",
})


def resolve_qmm_mode(mode: str, model_type: str | None) -> str:
    """`safekey_qmm_mode` for a model type: `"auto"` -> `"compact"` where it is tested exact (see
    :data:`COMPACT_EXACT_MODEL_TYPES`), else `"masked"`; `"compact"` on another model type raises."""
    if mode not in QMM_MODES:
        raise ConfigError(f"safekey_qmm_mode must be one of {QMM_MODES}, got {mode!r}")
    exact = model_type in COMPACT_EXACT_MODEL_TYPES
    if mode == "auto":
        return "compact" if exact else "masked"
    if mode == "compact" and not exact:
        raise ConfigError(
            f"safekey_qmm_mode='compact' is not tested to equal the masked (reference) pass for model type {model_type!r}; "
            f"use safekey_qmm_mode='masked' or 'auto' (tested: {', '.join(sorted(COMPACT_EXACT_MODEL_TYPES))})"
        )
    return mode


@dataclass
class SafeKeyConfig(SFTConfig):
    r"""
    Configuration class for the [`SafeKeyTrainer`]: every [`~trl.SFTConfig`] field, plus SafeKey's
    two auxiliary objectives. Parse it with `TrlParser` like any TRL config (all fields are
    `--safekey_*` flags). The reference setup (lr 1e-5, AdamW betas (0.9, 0.95), weight decay 1e-4,
    cosine schedule with 5% warm-up, 5 epochs) is in `examples/safekey_config.yaml`; the defaults of
    `SFTConfig` are left alone.

    Parameters:
        > Loss weights

        safekey_head_weight (`float`, defaults to `0.2`):
            Weight of the dual-path safety head loss `theta BCE(head_U) + (1 - theta) BCE(head_XU)`. `0`
            switches the heads off (they are then neither run nor trained).
        safekey_qmm_weight (`float`, defaults to `0.2`):
            Weight of the query-mask modelling loss (cross-entropy on K with the query hidden from
            attention). `0` skips the second forward pass.
        safekey_qmm_mode (`str`, defaults to `"auto"`):
            How the query-masked pass runs. `"masked"`: the reference's form (SafeKey `train/sft.py`):
            the sequence (up to the batch's last K token) with a 2-D attention mask that is 0 on every
            query token, at the positions `0..L-1`; any attention kernel. `"compact"`: only the tokens
            from the end of the query to the end of K, at their original positions; every one of them
            sees what it sees in the masked pass, so the K log-probabilities are the same (tested to
            1e-5 per model type, :data:`COMPACT_EXACT_MODEL_TYPES`: full, sliding-window, conv and
            linear-attention layers), at a fraction of the cost (1.04-1.10x an SFT step against
            1.43-1.71x for `"masked"` on SmolLM2-135M, 2 CPU cores, measured with the earlier 4-D
            form of `"masked"`). Refused for other model types. `"auto"` (default): `"compact"` for
            those model types, `"masked"` otherwise.

        > Schedule

        safekey_last_k_epochs (`float`, *optional*, defaults to `2`):
            The auxiliary losses are on only for the last `k` epochs: from optimiser step
            `max_steps - k * steps_per_epoch` on (`steps_per_epoch` = optimiser steps per pass over
            the training data). With `num_train_epochs = 5` that is epochs 4 and 5. When `max_steps`
            is set it is the same rule: the last `k * steps_per_epoch` steps of the run (all of them
            if the run is shorter). `None` keeps them on from the first step. If the training data
            has no length (an `IterableDataset`), they are on from the first step.

        > Heads

        safekey_head_theta (`float`, defaults to `0.5`):
            The reference's `--head_theta` (SafeKey `train/sft.py`): the weight between the two BCE
            terms, `L_head = theta * BCE(head_U) + (1 - theta) * BCE(head_XU)`, in [0, 1]. (Until
            this release `safekey_head_theta` was the accuracy threshold below; a value other than
            0.5 warns about the change.)
        safekey_head_accuracy_threshold (`float`, defaults to `0.5`):
            Decision threshold on `sigmoid(head logit)` for the logged head accuracy (harmful when
            above). Logging only: it does not enter the loss.
        safekey_detach_head_inputs (`bool`, defaults to `False`):
            Feed the heads detached hidden states: the heads then learn to read the model but the head
            loss no longer shapes the model's representations (the reference trains through them).
        safekey_head_learning_rate (`float`, *optional*):
            Learning rate of the heads' parameter groups (default: `learning_rate`). They follow the
            same schedule and weight decay as the model.
        safekey_save_heads (`bool`, defaults to `False`):
            Also write the heads (`safekey_heads.safetensors`) beside the model when `save_model` is
            called. Checkpoints always hold them, so that training resumes with them.
        safekey_clip_heads_with_model (`bool`, defaults to `False`):
            How `max_grad_norm` reaches the heads' gradients. `False`: the model's gradients are
            clipped by `Trainer` and the heads' separately, each to `max_grad_norm`. `True`: one
            global norm over the model's and the heads' gradients together and one scale factor for
            all of them, as in the reference, whose heads are a submodule of the DeepSpeed model
            (SafeKey `train/sft.py`). The logged `grad_norm` then includes the heads. One process or
            DDP (the heads' gradients are averaged over processes before the norm); refused under
            DeepSpeed, which clips the model's gradients inside its engine.

        > Data (used when the trainer is given raw (prompt, response, label) records)

        safekey_max_u_sentences (`int`, defaults to `4`):
            At most this many sentences in U for the heuristic U/K split.
        safekey_overlap_threshold (`float`, defaults to `0.5`):
            A sentence restates the query (and joins U) when at least this share of its content words
            occur in the query (or it opens with a restatement cue).
        safekey_prompt_key / safekey_response_key / safekey_label_key (`str`):
            Column names of the raw records (`"prompt"`, `"response"`, `"label"`).
    """

    safekey_head_weight: float = field(default=0.2, metadata={"help": "Weight of the dual-path safety head loss."})
    safekey_qmm_weight: float = field(default=0.2, metadata={"help": "Weight of the query-mask modelling loss (CE on K, query masked)."})
    safekey_qmm_mode: str = field(
        default="auto",
        metadata={"help": "'masked': the reference's pass (2-D attention mask, 0 on the query); 'compact': the same K log-probs "
                  "from the tokens after the query only (cheaper; tested model types only); 'auto': compact where tested, "
                  "else masked.", "choices": list(QMM_MODES)},
    )
    safekey_head_theta: float = field(
        default=0.5,
        metadata={"help": "The reference's --head_theta: L_head = theta * BCE(head_U) + (1 - theta) * BCE(head_XU)."},
    )
    safekey_head_accuracy_threshold: float = field(
        default=0.5, metadata={"help": "Threshold on sigmoid(head logit) for the logged head accuracy (not in the loss)."}
    )
    safekey_last_k_epochs: float | None = field(
        default=2,
        metadata={"help": "Auxiliary losses on for the last k epochs only (the last k * steps_per_epoch steps); None: always."},
    )
    safekey_detach_head_inputs: bool = field(
        default=False, metadata={"help": "Detach the hidden states fed to the heads (the head loss then does not train the model)."}
    )
    safekey_head_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the heads (default: learning_rate)."})
    safekey_save_heads: bool = field(default=False, metadata={"help": "Write safekey_heads.safetensors beside the saved model."})
    safekey_clip_heads_with_model: bool = field(
        default=False,
        metadata={"help": "Clip the heads' gradients together with the model's (one global norm, one scale, as the reference) "
                  "instead of separately, each to max_grad_norm."},
    )
    safekey_max_u_sentences: int = field(default=4, metadata={"help": "Heuristic U/K split: at most this many sentences in U."})
    safekey_overlap_threshold: float = field(
        default=0.5, metadata={"help": "Heuristic U/K split: share of a sentence's content words found in the query to count as restatement."}
    )
    safekey_prompt_key: str = field(default="prompt", metadata={"help": "Prompt column of raw records."})
    safekey_response_key: str = field(default="response", metadata={"help": "Response column of raw records."})
    safekey_label_key: str = field(default="label", metadata={"help": "Label column of raw records (1/harmful, 0/benign)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("safekey_head_weight", "safekey_qmm_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.safekey_qmm_mode not in QMM_MODES:
            raise ConfigError(f"safekey_qmm_mode {self.safekey_qmm_mode!r} is not one of {QMM_MODES}{did_you_mean(self.safekey_qmm_mode, QMM_MODES)}")
        theta = self.safekey_head_theta
        if not (isinstance(theta, (int, float)) and 0.0 <= theta <= 1.0):
            raise ConfigError(
                f"safekey_head_theta must be in [0, 1] (the reference's weight of BCE(head_U) against BCE(head_XU)), got {theta!r}; "
                "the accuracy threshold is safekey_head_accuracy_threshold"
            )
        if theta != 0.5:
            warnings.warn(
                f"safekey_head_theta={theta} weights the head loss as in the reference (theta * BCE(head_U) + "
                f"(1 - theta) * BCE(head_XU)); it was the accuracy threshold before, which is now "
                "safekey_head_accuracy_threshold",
                UserWarning,
                stacklevel=3,
            )
        if not 0.0 < self.safekey_head_accuracy_threshold < 1.0:
            raise ConfigError(f"safekey_head_accuracy_threshold must be in (0, 1), got {self.safekey_head_accuracy_threshold}")
        if self.safekey_last_k_epochs is not None and not self.safekey_last_k_epochs > 0:
            raise ConfigError(f"safekey_last_k_epochs must be > 0 (or None for always on), got {self.safekey_last_k_epochs}")
        if self.safekey_head_learning_rate is not None and not self.safekey_head_learning_rate >= 0:
            raise ConfigError(f"safekey_head_learning_rate must be >= 0, got {self.safekey_head_learning_rate}")
        if not isinstance(self.safekey_clip_heads_with_model, bool):
            raise ConfigError(f"safekey_clip_heads_with_model must be true or false, got {self.safekey_clip_heads_with_model!r}")
        if self.safekey_max_u_sentences < 1:
            raise ConfigError(f"safekey_max_u_sentences must be >= 1, got {self.safekey_max_u_sentences}")
        if not 0.0 < self.safekey_overlap_threshold <= 1.0:
            raise ConfigError(f"safekey_overlap_threshold must be in (0, 1], got {self.safekey_overlap_threshold}")
        if self.packing or self.padding_free:
            raise ConfigError(
                "SafeKey does not support packing or padding_free: each row must be one example with its own query "
                "mask; set packing=False and padding_free=False"
            )
        if self.truncation_mode != "keep_start":
            raise ConfigError(f"SafeKey needs truncation_mode='keep_start' (token spans are counted from the start), got {self.truncation_mode!r}")
