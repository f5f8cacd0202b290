"""`SafetyPeftMixin`: alignment anchors, drift and Safe LoRA projection on any PEFT LoRA model.

The mixin works on a model that holds PEFT LoRA layers (a `peft.PeftModel`, or a transformers
model with adapters injected). It needs no trainer:

```python
from peft import LoraConfig, get_peft_model
from hf_safety_merge.training import add_safety_mixin

model = add_safety_mixin(get_peft_model(aligned_model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
model.attach_alignment_anchors(aligned="org/chat-model", base="org/base-model",
                               cache_path="anchors/asft_anchors.safetensors")
...  # train any way you like
print(model.alignment_drift())             # {module: ||(I - C) s B A||_F}
model.project_to_safety_basin(threshold=0.35)  # Safe LoRA's post-hoc projection
```

`add_safety_mixin(model)` swaps the *instance's* class for a cached subclass
`Safety<ClassName>(SafetyPeftMixin, ClassName)`; nothing else about the model changes (its
state dict, `save_pretrained`, forward). Anchors are plain tensors held on the side, never
registered as parameters or buffers, so they are never saved into the adapter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from ...errors import ConfigError
from .anchors import AlignmentAnchors
from .binding import (  # noqa: F401  (re-exported: this module's public API)
    AnchorBinding,
    LoraTarget,
    _default_aligned,
    anchors_mismatch,
    bind_anchors,
    find_lora_targets,
    lora_targets_summary,
    resolve_anchors,
)
from .penalty import _batched_penalty, anchored_penalty  # noqa: F401
from .projector import ProjectorKind, basin_components

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)


class SafetyPeftMixin:
    """Mixin for PEFT LoRA models: attach alignment anchors, measure drift out of the safety
    basin, and project the LoRA weights back into it (Safe LoRA), without any trainer.

    Add it to an existing model with :func:`add_safety_mixin`, or define a class
    ``class MyModel(SafetyPeftMixin, PeftModelForCausalLM)``.
    """

    _safety_bindings: list[AnchorBinding]
    _safety_anchors: AlignmentAnchors | None

    def attach_alignment_anchors(
        self,
        anchors: AlignmentAnchors | str | os.PathLike[str] | None = None,
        *,
        aligned: str | os.PathLike[str] | None = None,
        base: str | os.PathLike[str] | None = None,
        cache_path: str | os.PathLike[str] | None = None,
        projector: ProjectorKind = "safe_lora",
        k: int | None = None,
        target_modules: Sequence[str] | None = None,
        adapter_name: str | None = None,
        dtype: str | torch.dtype = "float32",
        strict: bool = True,
        aligned_revision: str | None = None,
        base_revision: str | None = None,
        rebuild_stale: bool = False,
    ) -> list[str]:
        """Compute, load or take anchors for this model's LoRA modules and keep them attached.

        Args:
            anchors: an :class:`AlignmentAnchors`, or the path / Hub repo id of a cached file.
            aligned: the aligned checkpoint (default: the checkpoint this model was built from).
            base: the unaligned base checkpoint (needed unless anchors come from a file).
            cache_path: a safetensors file or a folder (holding `asft_anchors.safetensors`): loaded
                if it exists and matches this call (aligned / base checkpoints and revisions,
                projector, target modules), else written after computing.
            rebuild_stale: recompute a cache that does not match (default: a one-line error
                naming the mismatching field).
            projector / k: ``"safe_lora"`` (`V V^T / ||V||_F`) or ``"topk"`` (rank-`k` projector).
            target_modules: restrict to these LoRA modules (names, suffixes or regexes).
            adapter_name: which adapter's LoRA weights (default: the active adapters).
            strict: a LoRA module with no anchor is an error (else it is skipped).

        Returns:
            The names of the LoRA modules that now have an anchor.
        """
        module = self._as_module()
        targets = find_lora_targets(module, adapter_name, target_modules)
        if not targets:
            raise ConfigError(
                f"{type(self).__name__} has no LoRA linear layers"
                + (f" matching target_modules={list(target_modules)}" if target_modules else "")
            )
        if aligned is None and anchors is None:
            aligned = _default_aligned(module)
        anc = resolve_anchors(
            targets,
            anchors=anchors,
            aligned=aligned,
            base=base,
            cache_path=cache_path,
            projector=projector,
            k=k,
            dtype=dtype,
            aligned_revision=aligned_revision,
            base_revision=base_revision,
            on_mismatch="rebuild" if rebuild_stale else "error",
            rebuild_hint="pass rebuild_stale=True",
        )
        self._safety_anchors = anc
        self._safety_bindings = bind_anchors(targets, anc, strict=strict)
        return [b.target.name for b in self._safety_bindings]

    # -- queries --------------------------------------------------------------------------------

    def _as_module(self) -> nn.Module:
        if not isinstance(self, nn.Module):
            raise TypeError("SafetyPeftMixin must be mixed into a torch.nn.Module (e.g. a peft PeftModel)")
        return self

    def _bindings(self) -> list[AnchorBinding]:
        b = self.__dict__.get("_safety_bindings")
        if not b:
            raise ConfigError("no alignment anchors attached: call attach_alignment_anchors(...) first")
        return list(b)

    @property
    def alignment_anchors(self) -> AlignmentAnchors | None:
        """The attached anchors, or None."""
        return self.__dict__.get("_safety_anchors")

    def alignment_penalty(self, include_lora_scaling: bool = False) -> torch.Tensor:
        """The AsFT regulariser `sum_l ||(I - C_l) B_l A_l||_F^2` (differentiable), e.g. to add to
        a loss in a custom training loop."""
        p = anchored_penalty(self._bindings(), include_lora_scaling)
        assert p is not None
        return p

    def alignment_components(self, include_lora_scaling: bool = True) -> dict[str, dict[str, float]]:
        """Per module: norms of the LoRA update `D = s B A` (`total`), of its in-basin part `C D`,
        of its off-basin part `(I - C) D`, and Safe LoRA's cosine between `C D` and `D`."""
        out: dict[str, dict[str, float]] = {}
        for bnd in self._bindings():
            t = bnd.target
            anchor = bnd.anchor_on(t.lora_b.device)
            out[t.name] = basin_components(
                t.lora_b.detach().to(anchor.matrix.dtype),
                t.lora_a.detach().to(anchor.matrix.dtype),
                anchor,
                t.scaling if include_lora_scaling else 1.0,
            )
        return out

    def alignment_drift(self, include_lora_scaling: bool = True) -> dict[str, float]:
        """Per module, `||(I - C) s B A||_F`: the norm of the part of the current LoRA update that
        leaves the safety basin (with the LoRA scaling `s = alpha / r` by default, i.e. of the
        actual weight update)."""
        return {name: c["off_basin"] for name, c in self.alignment_components(include_lora_scaling).items()}

    @torch.no_grad()
    def project_to_safety_basin(
        self, threshold: float | None = 0.5, num_projected: int | None = None
    ) -> dict[str, dict[str, float | bool]]:
        """Safe LoRA's post-hoc projection: for each module with `cos(C D, D) <= threshold`
        (`D = B A`), replace `B` by `C B`, so that the update becomes `C D`.

        With `num_projected=n` instead, the `n` modules with the lowest cosine are projected (Safe
        LoRA's "number" mode). Returns, per module, the cosine before projection and whether it
        was projected. The change is in place on the LoRA B weights.
        """
        if (threshold is None) == (num_projected is None):
            raise ConfigError("project_to_safety_basin needs exactly one of threshold= or num_projected=")
        comps = self.alignment_components(include_lora_scaling=False)
        if num_projected is not None:
            if num_projected < 0:
                raise ConfigError(f"num_projected must be >= 0, got {num_projected}")
            chosen = set(sorted(comps, key=lambda n: comps[n]["cosine"])[:num_projected])
        else:
            chosen = {n for n, c in comps.items() if c["cosine"] <= float(threshold)}  # type: ignore[arg-type]
        report: dict[str, dict[str, float | bool]] = {}
        for bnd in self._bindings():
            t = bnd.target
            projected = t.name in chosen
            if projected:
                b = t.lora_b
                anchor = bnd.anchor_on(b.device)
                b.copy_(anchor.apply(b.to(anchor.matrix.dtype)).to(b.dtype))
            report[t.name] = {"cosine": comps[t.name]["cosine"], "projected": projected}
        return report


_MIXED: dict[type, type] = {}


def add_safety_mixin(model: M) -> M:
    """Give an existing model instance the :class:`SafetyPeftMixin` methods, in place.

    The instance's class becomes a (cached) subclass ``Safety<Class>(SafetyPeftMixin, Class)``;
    `isinstance(model, Class)` still holds and nothing is copied. Returns the same object.
    """
    cls = type(model)
    if isinstance(model, SafetyPeftMixin):
        return model
    if cls not in _MIXED:
        _MIXED[cls] = type(f"Safety{cls.__name__}", (SafetyPeftMixin, cls), {"__module__": cls.__module__})
    model.__class__ = _MIXED[cls]
    return model


