"""SafeKey (arXiv 2505.16186): dual-path safety head and query-mask modelling, as a TRL `SFTTrainer`.

Each example is a query X (the whole rendered prompt), a reasoning response whose reasoning opens
with a query-understanding segment U followed by the key sentence K, and a harmful/benign label
(see :mod:`hf_safety_merge.training.safekey.data` for how X, U and K are located in tokens).

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

Files: `config` (SafeKeyConfig), `data` (tokenised rows and U/K spans, no `trl` needed; `render`
renders the text, `segments` and `reference` find U and K), `collator`
(the query mask and the batch), `heads` (the dual-path head), `trainer` (SafeKeyTrainer). Layer 2
(docs/architecture.md): may import `errors` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .data import (
    SAFEKEY_COLUMNS,
    CharSpans,
    build_safekey_example,
    check_safekey_columns,
    from_reference_record,
    parse_label,
    prepare_safekey_dataset,
    split_understanding_key,
)

if TYPE_CHECKING:
    from .collator import SafeKeyDataCollator, build_qmm_inputs, qmm_attention_mask
    from .config import (
        COMPACT_EXACT_MODEL_TYPES,
        HEADS_FILE,
        QMM_MODES,
        SafeKeyConfig,
        resolve_qmm_mode,
    )
    from .heads import DualPathSafetyHead
    from .trainer import QMMOutput, SafeKeyTrainer

__all__ = [
    "COMPACT_EXACT_MODEL_TYPES",
    "HEADS_FILE",
    "QMM_MODES",
    "SAFEKEY_COLUMNS",
    "CharSpans",
    "DualPathSafetyHead",
    "QMMOutput",
    "SafeKeyConfig",
    "SafeKeyDataCollator",
    "SafeKeyTrainer",
    "build_qmm_inputs",
    "build_safekey_example",
    "check_safekey_columns",
    "from_reference_record",
    "parse_label",
    "prepare_safekey_dataset",
    "qmm_attention_mask",
    "resolve_qmm_mode",
    "split_understanding_key",
]

# The config, collator, heads and trainer need `trl`; the data preparation does not.
_LAZY = {
    "COMPACT_EXACT_MODEL_TYPES": "config", "HEADS_FILE": "config", "QMM_MODES": "config", "SafeKeyConfig": "config",
    "resolve_qmm_mode": "config", "SafeKeyDataCollator": "collator", "build_qmm_inputs": "collator",
    "qmm_attention_mask": "collator", "DualPathSafetyHead": "heads", "QMMOutput": "trainer", "SafeKeyTrainer": "trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
