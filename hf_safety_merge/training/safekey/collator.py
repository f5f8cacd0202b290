"""The query mask and SafeKey's collator: SFT batches plus U/K spans, labels and the QMM inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ...errors import ConfigError
from .data import SAFEKEY_COLUMNS

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
