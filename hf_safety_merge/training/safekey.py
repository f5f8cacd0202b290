"""SafeKey (arXiv 2505.16186): dual-path safety head and query-mask modelling, as a TRL `SFTTrainer`.

Each example is a query X (the whole rendered prompt), a reasoning response whose reasoning opens
with a query-understanding segment U followed by the key sentence K, and a harmful/benign label
(see :mod:`hf_safety_merge.training.safekey_data` for how X, U and K are located in tokens).

Loss per micro-batch, once the auxiliary losses are on (the last `safekey_last_k_epochs` epochs):

    L = L_SFT + w_qmm * L_QMM + w_head * L_head

- `L_SFT`: exactly `SFTTrainer`'s loss (the same forward, the same normalisation).
- `L_head` (dual-path safety head): two `Linear(hidden, 1)` heads read the final hidden states of
  that same forward, mean-pooled over U and over X+U; `L_head = theta BCE(U) + (1 - theta) BCE(X+U)`
  (`safekey_head_theta`, the reference's `--head_theta`, default 0.5) against
  the harmful (1) / benign (0) label. The heads live on the trainer: they are trained with the
  model (their own optimiser parameter groups) and never enter the model or its checkpoint
  (`save_safekey_heads` writes them beside it).
- `L_QMM` (query-mask modelling): a second forward pass of the same tokens, at the same positions
  (explicit `position_ids` `0..L-1`, what the model uses when none are given), with the reference's
  2-D attention mask: 0 on every query token, so that no token can attend to the query (the model
  builds its own causal, sliding-window, conv and linear-attention masks from it); cross-entropy on
  the K tokens only. The model must then produce K from its own understanding U. `"compact"` mode
  computes the same K log-probabilities from the tokens after the query alone, for the model types
  where that is tested to be exact (:data:`COMPACT_EXACT_MODEL_TYPES`).

Gradient accumulation: `L_SFT` is normalised over the whole optimiser step as `SFTTrainer` does; the
auxiliary losses are per-micro-batch means, divided by the number of accumulation steps when
`Trainer` does not do it, so each weight means the same per optimiser step whatever the
accumulation. DDP: the heads are not part of the DDP-wrapped model; their gradients are averaged
over processes just before each optimiser step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..errors import ConfigError, did_you_mean
from .safekey_data import (
    SAFEKEY_COLUMNS,
    CharSpans,
    build_safekey_example,
    check_safekey_columns,
    from_reference_record,
    parse_label,
    prepare_safekey_dataset,
    split_understanding_key,
)

logger = logging.getLogger(__name__)

__all__ = [
    "COMPACT_EXACT_MODEL_TYPES",
    "HEADS_FILE",
    "SAFEKEY_COLUMNS",
    "CharSpans",
    "DualPathSafetyHead",
    "QMMOutput",
    "SafeKeyConfig",
    "SafeKeyDataCollator",
    "SafeKeyTrainer",
    "build_safekey_example",
    "from_reference_record",
    "parse_label",
    "prepare_safekey_dataset",
    "qmm_attention_mask",
    "resolve_qmm_mode",
    "split_understanding_key",
]

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


# -- the query mask -------------------------------------------------------------------------------------


def qmm_attention_mask(query_len: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reference's query mask: the 2-D `attention_mask` `(batch, T)` with 0 on every query token
    (`j < query_len`), so that no token may attend to the query.

    Given to the model as its `attention_mask`, it goes through transformers' own mask building:
    causal, sliding-window (Mistral, Gemma) and chunked masks, and the padding masks of conv (LFM2)
    and linear-attention (Qwen3-Next) layers, all hide the query. (A custom 4-D mask would be passed
    through unchanged: no sliding window, and conv / linear-attention layers would still read the
    query.) Query rows attend to nothing, as left padding does; transformers' kernels return finite
    values for such rows, and no later row reads them.
    """
    b, t = attention_mask.shape
    pos = torch.arange(t, device=attention_mask.device)
    q = query_len.to(attention_mask.device).view(b, 1)
    return attention_mask.long().masked_fill(pos[None] < q, 0)


def build_qmm_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    query_len: torch.Tensor,
    k_mask: torch.Tensor,
    mode: str = "masked",
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """The inputs of the query-masked pass, cut at the batch's last K token (attention is causal:
    later tokens cannot change K's logits).

    - `mode="masked"` (the reference's form): `qmm_input_ids` = the tokens `0..L-1`,
      `qmm_attention_mask` = the 2-D mask of :func:`qmm_attention_mask` (0 on the query and on
      padding), `qmm_position_ids` = `0..L-1` (unchanged positions: what Llama, Qwen2 and the others
      use when the reference passes none).
    - `mode="compact"`: each row holds only its tokens from the end of the query to the end of K,
      right padded; `qmm_position_ids` are their original positions and `qmm_attention_mask` is the
      2-D padding mask (the model applies causality). In the masked pass a token after the query
      depends on nothing before the end of the query, so every kept token computes the same thing
      wherever a layer depends on positions only through `position_ids` and index differences (see
      :data:`COMPACT_EXACT_MODEL_TYPES`).

    Both add `qmm_logit_positions` (the positions, shared by the batch, whose next token is a K
    token in some row: the only ones sent through the LM head) and `qmm_targets` `(B, n)` (the K
    token predicted at each of those positions, -100 elsewhere). Built on the CPU by the collator, so
    that the training step needs no device synchronisation for them.
    """
    b, t = input_ids.shape
    dev = input_ids.device
    pos = torch.arange(t, device=dev)
    k_mask = k_mask.to(dev).bool()
    q = query_len.to(dev)
    k_end = torch.where(k_mask, pos[None] + 1, 0).max(1).values
    if mode == "auto":
        raise ConfigError("build_qmm_inputs needs a resolved mode ('masked' or 'compact'); see resolve_qmm_mode")
    if mode == "masked":
        length = int(k_end.max())
        ids = input_ids[:, :length].contiguous()
        out = {
            "qmm_input_ids": ids,
            "qmm_attention_mask": qmm_attention_mask(q, attention_mask[:, :length].to(dev)),
            "qmm_position_ids": pos[None, :length].expand(b, length).contiguous(),
        }
        k = k_mask[:, :length]
    elif mode == "compact":
        lengths = k_end - q
        ar = torch.arange(int(lengths.max()), device=dev)
        valid = ar[None] < lengths[:, None]
        idx = (q[:, None] + ar[None]).clamp(max=t - 1)
        ids = input_ids.gather(1, idx).masked_fill(~valid, pad_token_id)
        out = {"qmm_input_ids": ids, "qmm_attention_mask": valid.long(), "qmm_position_ids": idx}
        k = k_mask.gather(1, idx) & valid
    else:
        raise ConfigError(f"safekey_qmm_mode must be 'masked' or 'compact', got {mode!r}")
    predicts_k = torch.zeros_like(k)
    predicts_k[:, :-1] = k[:, 1:]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    positions = predicts_k.any(0).nonzero().flatten()
    out["qmm_logit_positions"] = positions
    out["qmm_targets"] = targets.masked_fill(~predicts_k, -100)[:, positions]
    return out


@dataclass
class SafeKeyDataCollator(DataCollatorForLanguageModeling):
    """`SFTTrainer`'s collator (the same `input_ids` / `labels` / `attention_mask`, right padding),
    plus SafeKey's fields:

    - `safekey_u_span` `(B, 2)` long: U's `[start, end)` token indices;
    - `safekey_k_mask` `(B, T)` bool: the K tokens;
    - `safekey_query_len` `(B,)` long: number of query (prompt) tokens;
    - `safekey_labels` `(B,)` float: 1 harmful, 0 benign;
    - `qmm_attention_mask` `(B, L)` long (see :func:`qmm_attention_mask`) and
      `qmm_position_ids` (the unchanged positions), with `qmm_input_ids`, `qmm_logit_positions` and
      `qmm_targets`: the inputs of the query-masked pass in `qmm_mode` (`"masked"` or `"compact"`,
      see :func:`build_qmm_inputs`; both span the tokens up to the batch's last K token), when
      `emit_qmm` is True.
    """

    emit_qmm: bool = True
    qmm_mode: str = "masked"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.padding_free:
            raise ConfigError("SafeKeyDataCollator does not support padding_free")
        for i, ex in enumerate(examples):
            missing = [c for c in SAFEKEY_COLUMNS if c not in ex or ex[c] is None]
            if missing:
                raise ConfigError(f"batch example {i} lacks {missing}; prepare the data with prepare_safekey_dataset")
        out = super().torch_call(examples)
        ids = out["input_ids"]
        b, t = ids.shape
        pos = torch.arange(t)
        q = torch.tensor([int(e["safekey_query_len"]) for e in examples], dtype=torch.long)
        u = torch.tensor([[int(e["safekey_u_start"]), int(e["safekey_u_end"])] for e in examples], dtype=torch.long)
        k = torch.tensor([[int(e["safekey_k_start"]), int(e["safekey_k_end"])] for e in examples], dtype=torch.long)
        lengths = torch.tensor([len(e["input_ids"]) for e in examples])
        if (q < 1).any() or (u[:, 0] < q).any() or (u[:, 1] <= u[:, 0]).any() or (k[:, 0] < u[:, 1]).any() or (k[:, 1] <= k[:, 0]).any() or (k[:, 1] > lengths).any():
            bad = next(i for i in range(b) if not (1 <= q[i] <= u[i, 0] < u[i, 1] <= k[i, 0] < k[i, 1] <= lengths[i]))
            raise ConfigError(
                f"batch example {bad}: SafeKey spans must satisfy 1 <= query_len <= u_start < u_end <= k_start < k_end "
                f"<= length ({int(lengths[bad])}), got query_len={int(q[bad])}, U={u[bad].tolist()}, K={k[bad].tolist()}"
            )
        out["safekey_u_span"] = u
        out["safekey_k_mask"] = (pos[None] >= k[:, :1]) & (pos[None] < k[:, 1:])
        out["safekey_query_len"] = q
        out["safekey_labels"] = torch.tensor([float(e["safekey_label"]) for e in examples], dtype=torch.float32)
        if self.emit_qmm:
            out.update(build_qmm_inputs(ids, out["attention_mask"], q, out["safekey_k_mask"], self.qmm_mode, self.pad_token_id))
        return out


@dataclass
class QMMOutput:
    """Result of the query-masked pass: `loss` (mean cross-entropy over the K tokens of the batch),
    `logprobs` `(B, n)` (log-probability of the target at each kept position) and `targets`
    `(B, n)` (-100 where a row has no K token there)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    targets: torch.Tensor

    @property
    def token_logprobs(self) -> torch.Tensor:
        """The log-probability of each K token, row by row, in order."""
        return self.logprobs[self.targets != -100]

    @property
    def rows(self) -> torch.Tensor:
        """The batch row of each entry of `token_logprobs`."""
        return (self.targets != -100).nonzero()[:, 0]


# -- the dual-path head ---------------------------------------------------------------------------------


class DualPathSafetyHead(nn.Module):
    """Two `Linear(hidden, 1)` heads on mean-pooled final hidden states: over U (`u_head`) and over
    X+U (`xu_head`). `forward` returns `(batch, 2)` logits (U, X+U)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.u_head = nn.Linear(self.hidden_size, 1)
        self.xu_head = nn.Linear(self.hidden_size, 1)

    def reset_parameters(self, seed: int = 0, std: float = 0.02) -> None:
        """Seeded init (its own generator: the global RNG, and so data order, is untouched)."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for lin in (self.u_head, self.xu_head):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
                lin.bias.zero_()

    @staticmethod
    def pool(hidden: torch.Tensor, u_span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of `hidden` `(B, T, H)` over U = `[u_start, u_end)` and over X+U = `[0, u_end)`."""
        t = hidden.shape[1]
        pos = torch.arange(t, device=hidden.device)[None]
        u0, u1 = u_span[:, :1].to(hidden.device), u_span[:, 1:].to(hidden.device)
        xu = (pos < u1).to(hidden.dtype)
        u = xu * (pos >= u0).to(hidden.dtype)
        pooled_u = torch.einsum("bt,bth->bh", u, hidden) / u.sum(1, keepdim=True).clamp(min=1)
        pooled_xu = torch.einsum("bt,bth->bh", xu, hidden) / xu.sum(1, keepdim=True).clamp(min=1)
        return pooled_u, pooled_xu

    def forward(self, hidden: torch.Tensor, u_span: torch.Tensor) -> torch.Tensor:
        w = self.u_head.weight
        pooled_u, pooled_xu = self.pool(hidden.to(w.dtype), u_span)
        return torch.cat([self.u_head(pooled_u), self.xu_head(pooled_xu)], dim=-1)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, theta: float = 0.5) -> torch.Tensor:
        """`theta BCE(U) + (1 - theta) BCE(X+U)`, each averaged over the batch (the reference's
        `head_theta * L_head_C + (1 - head_theta) * L_head_ctx`, default 0.5)."""
        y = labels.to(logits.dtype)[:, None].expand_as(logits)
        per_head = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
        return theta * per_head[0] + (1.0 - theta) * per_head[1]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `safekey_heads.safetensors` into the folder `path` (or to `path` if it ends in `.safetensors`)."""
        from safetensors.torch import save_file

        p = Path(path)
        if p.suffix != ".safetensors":
            p.mkdir(parents=True, exist_ok=True)
            p = p / HEADS_FILE
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(p), metadata={"format": "safekey_dual_path_head", "hidden_size": str(self.hidden_size)})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DualPathSafetyHead:
        from safetensors import safe_open
        from safetensors.torch import load_file

        p = Path(path)
        if p.is_dir():
            p = p / HEADS_FILE
        if not p.is_file():
            raise ConfigError(f"no SafeKey heads at {p}")
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "safekey_dual_path_head":
            raise ConfigError(f"{p} is not a SafeKey heads file (metadata {meta})")
        head = cls(int(meta["hidden_size"]))
        head.load_state_dict(load_file(str(p)))
        return head


# -- the trainer ----------------------------------------------------------------------------------------


def _longest_row(dataset: Any) -> int:
    """Length of the longest `input_ids` row (from the Arrow table, without reading the rows)."""
    try:
        import pyarrow.compute as pc

        if getattr(dataset, "_indices", None) is None:
            return int(pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)
    except Exception:  # an unusual backing store: read the column instead
        pass
    return max((len(x) for x in dataset["input_ids"]), default=0)


class _EpochCallback(TrainerCallback):
    """Records the number of optimiser steps per epoch when training starts (for the schedule)."""

    def __init__(self, trainer: SafeKeyTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        dl = kwargs.get("train_dataloader")
        try:
            n = len(dl) if dl is not None else None
        except TypeError:
            n = None
        if n is None:
            self.trainer._safekey_steps_per_epoch = None
            if args.safekey_last_k_epochs is not None:
                logger.warning("SafeKey: the training data has no length; the auxiliary losses are on from the first step")
            return
        ga = max(1, args.gradient_accumulation_steps)
        self.trainer._safekey_steps_per_epoch = max(n // ga + int(n % ga > 0), 1)


class SafeKeyTrainer(SFTTrainer):
    """`SFTTrainer` plus SafeKey's dual-path safety head and query-mask modelling losses.

    Takes the same arguments as [`~trl.SFTTrainer`] with a [`SafeKeyConfig`]. The training data is
    either prepared rows (`input_ids`, `labels` and the `safekey_*` columns of
    :func:`prepare_safekey_dataset`) or raw records with `prompt`, `response` and `label` columns
    (prepared on the fly with the trainer's tokenizer and `max_length`). `heads=` passes a
    :class:`DualPathSafetyHead` (e.g. loaded from an earlier run) instead of fresh ones.

    Logged metrics (through TRL's `_metrics`, averaged over the logging window, `eval_` prefixed in
    evaluation): `safekey/sft_loss`, `safekey/head_loss`, `safekey/head_accuracy` (both heads; `_u`
    and `_xu` each), `safekey/qmm_loss` and `safekey/aux_active` (1 when the auxiliary losses are in
    the training loss; TRL's `loss` is then the total). The evaluation loss is `L_SFT` alone (comparable to `SFTTrainer`); the auxiliary metrics
    are computed in evaluation whatever the schedule.
    """

    args: SafeKeyConfig
    #: the QMM mode in use: `safekey_qmm_mode` with "auto" resolved for the model (see :func:`resolve_qmm_mode`)
    safekey_qmm_mode: str

    def __init__(self, *args: Any, heads: DualPathSafetyHead | None = None, **kwargs: Any) -> None:
        cfg = kwargs.get("args", args[1] if len(args) > 1 else None)
        if cfg is not None and not isinstance(cfg, SafeKeyConfig):
            raise ConfigError(f"SafeKeyTrainer needs a SafeKeyConfig as args, got {type(cfg).__name__}")
        if cfg is None:
            raise ConfigError("SafeKeyTrainer needs args=SafeKeyConfig(...)")
        user_collator = kwargs.get("data_collator", args[2] if len(args) > 2 else None)
        if user_collator is not None and not isinstance(user_collator, SafeKeyDataCollator):
            raise ConfigError(f"SafeKeyTrainer needs a SafeKeyDataCollator (or none), got {type(user_collator).__name__}")
        super().__init__(*args, **kwargs)
        cfg = self.args
        if not isinstance(self.data_collator, SafeKeyDataCollator):
            self.data_collator = SafeKeyDataCollator(
                pad_token_id=self._tokenizer.pad_token_id, pad_to_multiple_of=cast("int | None", cfg.pad_to_multiple_of)
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        text_config = base.config.get_text_config()
        model_type = getattr(base.config, "model_type", None)  # the model that runs (a multimodal wrapper is not its text model)
        if cfg.safekey_qmm_weight > 0:
            self.safekey_qmm_mode = resolve_qmm_mode(cfg.safekey_qmm_mode, model_type)
            logger.info("SafeKey: query-mask modelling in %r mode (model type %r)", self.safekey_qmm_mode, model_type)
        else:  # no QMM pass: nothing to refuse
            self.safekey_qmm_mode = "masked" if cfg.safekey_qmm_mode == "auto" else cfg.safekey_qmm_mode
        self.data_collator.emit_qmm = cfg.safekey_qmm_weight > 0
        self.data_collator.qmm_mode = self.safekey_qmm_mode
        if self._skip_prepare_dataset and self.train_dataset is not None:
            from trl.data_utils import get_dataset_column_names

            check_safekey_columns(get_dataset_column_names(self.train_dataset), "train")

        hidden = int(text_config.hidden_size)
        if heads is None:
            heads = DualPathSafetyHead(hidden)
            heads.reset_parameters(cfg.seed, float(getattr(text_config, "initializer_range", 0.02) or 0.02))
        elif heads.hidden_size != hidden:
            raise ConfigError(f"heads= has hidden size {heads.hidden_size}, the model {hidden}")
        self.safekey_heads: DualPathSafetyHead = heads.to(device=self.args.device, dtype=torch.float32)
        self._safekey_backbone: nn.Module = base.base_model
        self._safekey_capture = False
        self._safekey_hidden: torch.Tensor | None = None
        self._safekey_backbone.register_forward_hook(self._capture_hidden)
        self._safekey_steps_per_epoch: int | None = None
        self.add_callback(_EpochCallback(self))

    # -- data -------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, packing: bool, formatting_func: Any, dataset_name: str) -> Any:
        from trl.data_utils import get_dataset_column_names

        if formatting_func is not None:
            raise ConfigError("SafeKeyTrainer does not take a formatting_func; give (prompt, response, label) records")
        cols = get_dataset_column_names(dataset)
        if cols is not None and "input_ids" not in cols:
            a: SafeKeyConfig = args
            dataset = prepare_safekey_dataset(
                dataset, self._tokenizer, max_length=a.max_length, prompt_key=a.safekey_prompt_key,
                response_key=a.safekey_response_key, label_key=a.safekey_label_key,
                max_u_sentences=a.safekey_max_u_sentences, overlap_threshold=a.safekey_overlap_threshold,
            )
            cols = get_dataset_column_names(dataset)
        check_safekey_columns(cols, dataset_name)
        if args.max_length is not None and hasattr(dataset, "__len__") and len(dataset) > 0:
            longest = _longest_row(dataset)
            if longest > args.max_length:
                raise ConfigError(
                    f"the {dataset_name} data set has rows of {longest} tokens, more than max_length={args.max_length}; "
                    "prepare it with prepare_safekey_dataset(..., max_length=max_length)"
                )
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", *SAFEKEY_COLUMNS]  # type: ignore[assignment]

    # -- optimiser, saving ------------------------------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        opt = super().create_optimizer(model)
        raw = getattr(opt, "optimizer", opt)
        present = {id(p) for g in raw.param_groups for p in g["params"]}
        heads = self.safekey_heads
        if self.args.safekey_head_weight > 0 and not any(id(p) in present for p in heads.parameters()):
            lr = self.args.safekey_head_learning_rate
            lr = self.args.learning_rate if lr is None else lr
            weights = [heads.u_head.weight, heads.xu_head.weight]
            biases = [heads.u_head.bias, heads.xu_head.bias]
            raw.add_param_group({"params": weights, "weight_decay": self.args.weight_decay, "lr": lr})
            raw.add_param_group({"params": biases, "weight_decay": 0.0, "lr": lr})
            raw.register_step_pre_hook(self._sync_head_grads)
        return opt

    def _sync_head_grads(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Average the heads' gradients over processes (they sit outside DDP) and clip them."""
        grads = [p.grad for p in self.safekey_heads.parameters() if p.grad is not None]
        if not grads:
            return
        if self.accelerator.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.accelerator.num_processes
            i = 0
            for g in grads:
                g.copy_(flat[i : i + g.numel()].view_as(g))
                i += g.numel()
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.safekey_heads.parameters()), self.args.max_grad_norm)

    def save_safekey_heads(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the heads as `safekey_heads.safetensors` into `path` (default: `output_dir`)."""
        target = path if path is not None else self.args.output_dir
        assert target is not None
        return self.safekey_heads.save(target)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if (self.args.safekey_save_heads or _internal_call) and self.args.should_save:
            self.save_safekey_heads(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        p = Path(resume_from_checkpoint) / HEADS_FILE
        if p.is_file():
            loaded = DualPathSafetyHead.load(p)
            self.safekey_heads.load_state_dict(loaded.state_dict())
        else:
            logger.warning("SafeKey: %s has no %s; the heads start afresh", resume_from_checkpoint, HEADS_FILE)

    # -- loss -------------------------------------------------------------------------------------------

    def _capture_hidden(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._safekey_capture and self._safekey_hidden is None:  # the first (gradient-carrying) pass
            h = getattr(output, "last_hidden_state", None)
            self._safekey_hidden = h if h is not None else output[0]

    def safekey_aux_active(self) -> bool:
        """Are the auxiliary losses in the training loss at the current step (see `safekey_last_k_epochs`)?"""
        k = self.args.safekey_last_k_epochs
        spe = self._safekey_steps_per_epoch
        if k is None or spe is None or self.state.max_steps <= 0:
            return True
        start = max(0, self.state.max_steps - math.ceil(k * spe - 1e-9))
        return self.state.global_step >= start

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of `Trainer.training_step`: is the returned loss already normalised over the whole
        accumulated step (so that `training_step` will not divide it by the accumulation steps)?"""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def qmm_forward(self, model: nn.Module, inputs: dict[str, Any], *, logits: bool = False, mode: str | None = None) -> Any:
        """The query-masked forward pass (see :func:`build_qmm_inputs` for the two modes).

        Uses the collator's `qmm_*` inputs when they are there and of the requested `mode` (default:
        the trainer's resolved `safekey_qmm_mode`), else builds them from the batch. `logits=False`: a :class:`QMMOutput`;
        only the positions predicting K go through the LM head (`logits_to_keep`), and nothing waits
        on the device. `logits=True`: the model's plain output on the QMM inputs (full logits, for
        inspection; position `j` of row `r` is token `j`, or `query_len[r] + j` in compact mode).
        """
        mode = self.safekey_qmm_mode if mode in (None, "auto") else mode
        collated = getattr(self.data_collator, "qmm_mode", None) == mode
        if not (collated and "qmm_input_ids" in inputs):
            inputs = {**inputs, **build_qmm_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["safekey_query_len"],
                                                   inputs["safekey_k_mask"], mode, self._tokenizer.pad_token_id or 0)}
        mask = inputs["qmm_attention_mask"]
        kw = dict(input_ids=inputs["qmm_input_ids"], attention_mask=mask, position_ids=inputs["qmm_position_ids"], use_cache=False)
        if logits:
            return model(**kw)
        positions, targets = inputs["qmm_logit_positions"], inputs["qmm_targets"]
        lg = model(**kw, logits_to_keep=positions).logits
        if lg.dim() != 3 or lg.shape[1] != positions.shape[0]:  # a model without `logits_to_keep`
            lg = model(**kw).logits[:, positions]
        nll = nn.functional.cross_entropy(lg.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
        nll = nll.view(targets.shape)
        loss = nll.sum() / (targets != -100).sum().clamp(min=1)
        return QMMOutput(loss=loss, logprobs=-nll, targets=targets)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        extras = {k: inputs.pop(k) for k in list(inputs) if k.startswith(("safekey_", "qmm_"))}
        if "safekey_u_span" not in extras:
            raise ConfigError("SafeKeyTrainer got a batch without SafeKey fields; use SafeKeyDataCollator")
        cfg = self.args
        mode = "train" if model.training else "eval"
        train = mode == "train" and torch.is_grad_enabled()
        active = self.safekey_aux_active() if mode == "train" else True
        use_head = active and cfg.safekey_head_weight > 0
        use_qmm = active and cfg.safekey_qmm_weight > 0

        # The query-masked pass goes first: its kernels are queued before SFTTrainer's metrics wait
        # on the device, and its (small) backward comes last, behind the main pass's.
        qmm_loss = self.qmm_forward(model, {**inputs, **extras}).loss if use_qmm else None
        self._safekey_capture = use_head
        self._safekey_hidden = None
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._safekey_capture = False
        loss, outputs = result if return_outputs else (result, None)
        hidden, self._safekey_hidden = self._safekey_hidden, None
        steps = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1)) if train else 1
        scale = 1.0 / steps if train and self._loss_is_scaled_for_ga(num_items_in_batch) else 1.0

        metrics: dict[str, torch.Tensor] = {"safekey/sft_loss": loss.detach().float() / (scale if train else 1.0)}
        if mode == "train":
            metrics["safekey/aux_active"] = torch.tensor(float(active), device=loss.device)
        if use_head:
            if hidden is None:
                raise RuntimeError("SafeKey: the final hidden states were not captured (unsupported model wrapper)")
            h = hidden.detach() if cfg.safekey_detach_head_inputs else hidden
            with torch.autocast(device_type=h.device.type, enabled=False):
                head_logits = self.safekey_heads(h, extras["safekey_u_span"])
                head_loss = DualPathSafetyHead.loss(head_logits, extras["safekey_labels"], float(cfg.safekey_head_theta))
            if train:
                loss = loss + (cfg.safekey_head_weight * scale) * head_loss.to(loss.dtype)
            with torch.no_grad():
                y = extras["safekey_labels"].to(head_logits.device)[:, None] >= 0.5
                correct = ((torch.sigmoid(head_logits) > cfg.safekey_head_accuracy_threshold) == y).float().mean(0)
                metrics["safekey/head_loss"] = head_loss.detach().float()
                metrics["safekey/head_accuracy"] = correct.mean()
                metrics["safekey/head_accuracy_u"] = correct[0]
                metrics["safekey/head_accuracy_xu"] = correct[1]
        if qmm_loss is not None:
            if train:
                loss = loss + (cfg.safekey_qmm_weight * scale) * qmm_loss.to(loss.dtype)
            metrics["safekey/qmm_loss"] = qmm_loss.detach().float()
        if metrics:  # one gather and one device sync for all of them
            stacked = torch.stack([v.reshape(()).float().to(loss.device) for v in metrics.values()])
            values = self.accelerator.gather_for_metrics(stacked[None]).mean(0).tolist()
            for key, v in zip(metrics, values, strict=True):
                self._metrics[mode][key].append(v)
        return (loss, outputs) if return_outputs else loss

    def safekey_summary(self) -> dict[str, Any]:
        """The last logged values of the SafeKey metrics (for scripts)."""
        out: dict[str, Any] = {}
        for h in self.state.log_history:
            for k, v in h.items():
                if k.startswith("safekey/"):
                    out[k] = v
        return json.loads(json.dumps(out))
