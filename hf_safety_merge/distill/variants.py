"""EnchTable's distillation variants: which blocks are trained and how, and their names.

The variants (:data:`VARIANTS`) follow the EnchTable reference code
(`safety_distillation/LLaMA-Factory/src/llamafactory/train/sft/workflow.py` in AntCPLab/EnchTable,
its `ntk` switch) under the reference's names:

- ``"ffn"``: each MLP block linearised as a whole (reference `ntk='ffn'`);
- ``"attn"``: the attention block's parameters trained *plainly* (reference `ntk='attn'`, its shipped
  choice: it wraps each of q/k/v/o `nn.Linear` on its own, and a Linear is already linear in its
  weight, so its first-order expansion is the Linear itself: plain fine-tuning of the projections);
- ``"attn_ffn"``: both of the above (reference `ntk='attn_ffn'`);

and two extensions that are *not* in the reference, named so:

- ``"attn_block"``: the whole attention block (projections, RoPE, softmax) linearised;
- ``"attn_block_ffn"``: whole attention block and MLP block, each linearised on its own
  (``"hybrid"`` is its deprecated alias).

Plain data and names only (no torch): :mod:`.config` validates against them,
:mod:`.linearize` applies them to a model.
"""

from __future__ import annotations

import warnings
from typing import Literal

from ..errors import ConfigError, did_you_mean

Variant = Literal["ffn", "attn", "attn_ffn", "attn_block", "attn_block_ffn"]
#: The variants; the first three are the EnchTable reference's `ntk` modes, the last two extensions.
VARIANTS: tuple[str, ...] = ("ffn", "attn", "attn_ffn", "attn_block", "attn_block_ffn")
#: Old names still accepted (with a FutureWarning) and what they mean now.
DEPRECATED_VARIANTS: dict[str, str] = {"hybrid": "attn_block_ffn"}
#: Per variant: how the attention block and the MLP block are trained ("linearized", "plain" or None).
VARIANT_BLOCKS: dict[str, tuple[str | None, str | None]] = {
    "ffn": (None, "linearized"),
    "attn": ("plain", None),
    "attn_ffn": ("plain", "linearized"),
    "attn_block": ("linearized", None),
    "attn_block_ffn": ("linearized", "linearized"),
}
#: One line per variant (recorded in the vector's card).
VARIANT_DESCRIPTIONS: dict[str, str] = {
    "ffn": "MLP blocks NTK-linearised (EnchTable reference ntk='ffn')",
    "attn": "attention projections fine-tuned plainly (EnchTable reference ntk='attn': a linearised "
    "nn.Linear is the Linear itself)",
    "attn_ffn": "attention projections fine-tuned plainly + MLP blocks NTK-linearised (EnchTable reference "
    "ntk='attn_ffn')",
    "attn_block": "whole attention blocks NTK-linearised (extension, not in the EnchTable reference)",
    "attn_block_ffn": "whole attention blocks and MLP blocks NTK-linearised, each on its own (extension, not in "
    "the EnchTable reference)",
}


def resolve_variant(variant: str, *, warn_attn: bool = True) -> str:
    """The canonical variant name; unknown names are a :class:`ConfigError` (with a suggestion).

    ``"hybrid"`` is the deprecated name of ``"attn_block_ffn"`` (FutureWarning). ``"attn"`` changed
    meaning after 0.1.0: it now is the reference's ``ntk='attn'`` (plain fine-tuning of the attention
    projections); the whole-block linearisation it used to mean is ``"attn_block"`` (FutureWarning,
    so that an old config does not silently train something else; `warn_attn=False` leaves that
    warning to a later call).
    """
    name = str(variant)
    if name in DEPRECATED_VARIANTS:
        new = DEPRECATED_VARIANTS[name]
        warnings.warn(
            f"distillation variant {name!r} is deprecated; it is now called {new!r} (whole attention block and MLP "
            f"block, each NTK-linearised: an extension, not the EnchTable reference's 'attn_ffn')",
            FutureWarning,
            stacklevel=3,
        )
        return new
    if name not in VARIANTS:
        known = (*VARIANTS, *DEPRECATED_VARIANTS)
        raise ConfigError(f"variant {name!r} is not one of {VARIANTS}{did_you_mean(name, known)}")
    if name == "attn" and warn_attn:
        warnings.warn(
            "distillation variant 'attn' follows the EnchTable reference (ntk='attn'): plain fine-tuning of the "
            "attention projections, nothing is linearised. In hf-safety-merge 0.1.0 it linearised the whole "
            "attention block; that is now variant 'attn_block'.",
            FutureWarning,
            stacklevel=3,
        )
    return name


#: Child names under which decoder layers keep their MLP / attention block, across architectures.
MLP_NAMES: tuple[str, ...] = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
ATTN_NAMES: tuple[str, ...] = ("self_attn", "attention", "attn", "self_attention")
