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
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from ...errors import ConfigError
from .anchors import (
    DEFAULT_ANCHORS_FILENAME,
    AlignmentAnchors,
    Anchor,
    ProjectorKind,
    basin_components,
    checkpoint_fingerprint,
    module_key,
    offbasin_penalty,
    parse_dtype,
    resolve_key,
    same_checkpoint,
)

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)


@dataclass
class LoraTarget:
    """One LoRA-adapted linear layer of one adapter."""

    name: str  # full module name in the model (e.g. base_model.model.model.layers.0.self_attn.q_proj)
    layer: Any  # the peft LoraLayer
    adapter: str

    @property
    def key(self) -> str:
        return module_key(self.name)

    @property
    def lora_a(self) -> torch.Tensor:
        return self.layer.lora_A[self.adapter].weight

    @property
    def lora_b(self) -> torch.Tensor:
        return self.layer.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.layer, "fan_in_fan_out", False))


@dataclass
class AnchorBinding:
    """A LoRA target paired with its anchor (moved lazily to the LoRA weights' device)."""

    target: LoraTarget
    anchor: Anchor

    def anchor_on(self, device: torch.device) -> Anchor:
        if self.anchor.matrix.device != device:
            self.anchor = self.anchor.to(device)
        return self.anchor


def _active_adapters(model: nn.Module) -> list[str]:
    active = getattr(model, "active_adapters", None)
    if callable(active):  # transformers' PeftAdapterMixin exposes a method
        try:
            active = active()
        except ValueError:  # transformers: "No adapter loaded" on a model without adapters
            return []
    if active is None:
        active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return [active]
    return list(active) if active else ["default"]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT-like module selection: an entry matches a module whose name is it or ends with
    ``.<entry>``, or which it matches as a full regular expression."""
    for p in patterns:
        if name == p or name.endswith("." + p):
            return True
        try:
            if re.fullmatch(p, name):
                return True
        except re.error as e:
            raise ConfigError(f"target module pattern {p!r} is not a valid regex: {e}") from e
    return False


def find_lora_targets(
    model: nn.Module, adapter_name: str | None = None, target_modules: Sequence[str] | None = None
) -> list[LoraTarget]:
    """Every LoRA-adapted linear layer of `model` (for `adapter_name`, default: the active
    adapters), optionally restricted to `target_modules` (names, suffixes or regexes)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover - peft is a dependency of this subpackage
        raise ImportError("AsFT needs peft: pip install peft") from e
    adapters = [adapter_name] if adapter_name else _active_adapters(model)
    out: list[LoraTarget] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for ad in adapters:
            la = getattr(mod, "lora_A", {})
            if ad not in la or not isinstance(la[ad], nn.Linear):
                continue  # embeddings / convolutions: not covered by the anchors
            if target_modules is not None and not _matches(module_key(name), target_modules):
                continue
            out.append(LoraTarget(name, mod, ad))
    return out


def _default_aligned(model: nn.Module) -> str | None:
    """The checkpoint the LoRA model was built on (the aligned model, in AsFT's setting)."""
    peft_cfg = getattr(model, "peft_config", None)
    if isinstance(peft_cfg, dict):
        for cfg in peft_cfg.values():
            ref = getattr(cfg, "base_model_name_or_path", None)
            if ref:
                return str(ref)
    cfg = getattr(model, "config", None)
    ref = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return str(ref) if ref else None


def anchors_mismatch(
    cached: AlignmentAnchors,
    targets: Sequence[LoraTarget],
    *,
    aligned: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    aligned_revision: str | None = None,
    base_revision: str | None = None,
    projector: ProjectorKind | None = None,
    k: int | None = None,
) -> str | None:
    """What in `cached` does not match this run, as one phrase naming the field, or None.

    Compared: the aligned and base checkpoints and their revisions (each only when this run names
    that checkpoint: `None` means "not known here", e.g. anchors passed in without a base), the
    projector and its rank, and whether every LoRA target has an anchor (a cache covering more
    modules is fine: an anchor depends on its own module's weights only). Checkpoints compare equal
    when the strings agree or they resolve to the same local folder; a local checkpoint whose
    weight files changed (size or modification time) since the anchors were built does not match.
    """
    meta = cached.meta
    for what, given, rev in (("aligned", aligned, aligned_revision), ("base", base, base_revision)):
        if given is None:
            continue
        if what not in meta:  # not written by from_checkpoints: nothing to compare with
            logger.warning("AsFT: the anchors file does not record its %s model; cannot check it against %s", what, given)
            continue
        if not same_checkpoint(meta.get(what), meta.get(f"{what}_path"), given):
            return f"{what} model {meta.get(what)!r}, but this run's {what} model is {str(given)!r}"
        recorded_files, files = meta.get(f"{what}_files"), checkpoint_fingerprint(given)
        if recorded_files is not None and files is not None and recorded_files != files:
            changed = sorted(set(recorded_files) ^ set(files) | {f for f in files if recorded_files.get(f) != files[f]})
            return f"{what} model {str(given)!r} as it was before its weight files changed ({', '.join(changed[:3])})"
        if meta.get(f"{what}_revision") != rev:
            return f"{what} revision {meta.get(f'{what}_revision')!r}, but this run asks for {rev!r}"
    if projector is not None and cached.projector != projector:
        return f"projector {cached.projector!r}, but this run asks for {projector!r}"
    if projector == "topk" and k is not None and cached.k != k:
        return f"projector rank k={cached.k}, but this run asks for k={k}"
    missing = [t.key for t in targets if cached.get_for(t.key) is None]
    if missing:
        return (
            f"anchors for {len(cached)} modules, but not for {len(missing)} of this run's LoRA target modules "
            f"(e.g. {missing[0]!r})"
        )
    return None


def resolve_anchors(
    targets: Sequence[LoraTarget],
    *,
    anchors: AlignmentAnchors | str | os.PathLike[str] | None = None,
    aligned: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    projector: ProjectorKind = "safe_lora",
    k: int | None = None,
    dtype: str | torch.dtype = "float32",
    aligned_revision: str | None = None,
    base_revision: str | None = None,
    device: str | torch.device = "cpu",
    on_mismatch: Literal["error", "rebuild"] = "error",
    rebuild_hint: str = "pass on_mismatch='rebuild'",
) -> AlignmentAnchors:
    """Get anchors for `targets`: given, loaded from `anchors` / an existing `cache_path`, or
    streamed from the `aligned` and `base` checkpoints (then written to `cache_path` if given).

    `cache_path` is a safetensors file or a folder (which then holds `asft_anchors.safetensors`;
    an existing empty folder is fine). A cached or given anchors file is checked against this run
    (:func:`anchors_mismatch`: aligned / base checkpoints and revisions, projector, target
    modules). On a mismatch a cache is rebuilt when `on_mismatch="rebuild"` (and the base is
    known), otherwise a one-line :class:`ConfigError` names the field; `rebuild_hint` says how
    to rebuild in the caller's terms.
    """
    if isinstance(anchors, AlignmentAnchors):
        return anchors
    want_dtype = parse_dtype(dtype)

    def checked(loaded: AlignmentAnchors, where: str, can_rebuild: bool) -> AlignmentAnchors | None:
        problem = anchors_mismatch(
            loaded, targets, aligned=aligned, base=base, aligned_revision=aligned_revision,
            base_revision=base_revision, projector=projector, k=k,
        )
        if problem is None:
            if any(a.matrix.dtype != want_dtype for a in loaded.anchors.values()):
                loaded.anchors = {n: a.to(dtype=want_dtype) for n, a in loaded.anchors.items()}
            logger.info("AsFT: loaded %d alignment anchors from %s", len(loaded), where)
            return loaded
        if can_rebuild and on_mismatch == "rebuild":
            logger.warning("AsFT: %s: stale alignment anchors (built with %s); rebuilding", where, problem)
            return None
        fix = f"delete it, point the cache elsewhere, or {rebuild_hint}" if can_rebuild else "use anchors built for this run"
        raise ConfigError(f"{where}: the alignment anchors there were built with {problem}; {fix}")

    if anchors is not None:
        got = checked(AlignmentAnchors.load(anchors), str(anchors), can_rebuild=False)
        assert got is not None
        return got
    cache_file: Path | None = None
    if cache_path is not None:
        cp = Path(cache_path)
        cache_file = cp / DEFAULT_ANCHORS_FILENAME if (cp.is_dir() or cp.suffix != ".safetensors") else cp
        if cache_file.is_file():
            got = checked(AlignmentAnchors.load(cache_file), str(cache_file), can_rebuild=base is not None)
            if got is not None:
                return got
    if base is None:
        raise ConfigError(
            "alignment anchors need either an anchors file (anchors / cache_path) or the base (unaligned) checkpoint "
            "`base` to compute V = W_aligned - W_base"
            + (f" ({cache_file} does not exist yet)" if cache_file is not None else "")
        )
    if aligned is None:
        raise ConfigError("alignment anchors need the aligned checkpoint `aligned` (default: the model's own checkpoint, which is unknown here)")
    result = AlignmentAnchors.from_checkpoints(
        aligned,
        base,
        [t.key for t in targets],
        projector=projector,
        k=k,
        dtype=dtype,
        transpose=[t.key for t in targets if t.fan_in_fan_out],
        aligned_revision=aligned_revision,
        base_revision=base_revision,
        device=device,
    )
    if cache_file is not None:
        written = result.save(cache_file)
        logger.info("AsFT: wrote %d alignment anchors to %s", len(result), written)
    return result


def bind_anchors(targets: Sequence[LoraTarget], anchors: AlignmentAnchors, strict: bool = True) -> list[AnchorBinding]:
    """Pair each LoRA target with its anchor, checking shapes. With `strict`, a target without
    an anchor is an error; otherwise it is skipped with a warning."""
    bindings: list[AnchorBinding] = []
    for t in targets:
        key = resolve_key(t.key, anchors.anchors)
        if key is None:
            msg = f"no alignment anchor for LoRA module {t.key!r} (anchors cover {len(anchors)} modules, e.g. {next(iter(anchors), None)!r})"
            if strict:
                raise ConfigError(msg)
            logger.warning("AsFT: %s; skipped", msg)
            continue
        a = anchors[key]
        out_f = t.lora_b.shape[0]
        if a.out_features != out_f:
            raise ConfigError(f"alignment anchor {key!r} is for {a.out_features} output features but LoRA module {t.name!r} has {out_f}")
        bindings.append(AnchorBinding(t, a))
    return bindings


class _StackedAnchors:
    """Anchors of one group of same-shape modules stacked into one (L, out, k) tensor, kept
    while the bindings hold the same anchor tensors (they are fixed during training)."""

    def __init__(self, anchors: list[Anchor]) -> None:
        self.sources = [a.matrix for a in anchors]  # held: identity checks stay valid
        self.versions = [m._version for m in self.sources]  # in-place updates bump it
        self.stacked = torch.stack(self.sources)

    def valid_for(self, anchors: list[Anchor]) -> bool:
        return len(anchors) == len(self.sources) and all(
            a.matrix is m and m._version == v for a, m, v in zip(anchors, self.sources, self.versions))


_STACK_CACHE: dict[tuple[Any, ...], _StackedAnchors] = {}


def _group_key(bnd: AnchorBinding, anchor: Anchor, scaling: float) -> tuple[Any, ...]:
    b, a = bnd.target.lora_b, bnd.target.lora_a
    return (anchor.kind, tuple(anchor.matrix.shape), anchor.matrix.dtype, tuple(b.shape), tuple(a.shape), b.device, scaling)


def _batched_penalty(bindings: list[AnchorBinding], include_lora_scaling: bool) -> torch.Tensor | None:
    """The same sum with one batched product per group of same-shape modules (e.g. every q_proj):
    `M = B - C B` as `bmm`s over the stacked group, then `sum((M^T M) * (A A^T))` per module.
    Equal to the per-module loop in exact arithmetic (tested to float32 rounding), and a handful
    of kernel launches instead of ~6 per module on a GPU."""
    groups: dict[tuple[Any, ...], list[tuple[AnchorBinding, Anchor, float]]] = {}
    for bnd in bindings:
        anchor = bnd.anchor_on(bnd.target.lora_b.device)
        scaling = bnd.target.scaling if include_lora_scaling else 1.0
        groups.setdefault(_group_key(bnd, anchor, scaling), []).append((bnd, anchor, scaling))
    total: torch.Tensor | None = None
    for key, members in groups.items():
        anchors = [m[1] for m in members]
        cache_key = (key, tuple(id(m[0]) for m in members))
        stacked = _STACK_CACHE.get(cache_key)
        if stacked is None or not stacked.valid_for(anchors):
            if len(_STACK_CACHE) > 64:
                _STACK_CACHE.clear()
            stacked = _StackedAnchors(anchors)
            _STACK_CACHE[cache_key] = stacked
        c = stacked.stacked
        dtype = c.dtype
        with torch.autocast(device_type=c.device.type, enabled=False):
            b = torch.stack([m[0].target.lora_b.to(dtype) for m in members])  # (L, out, r)
            a = torch.stack([m[0].target.lora_a.to(dtype) for m in members])  # (L, r, in)
            cb = torch.bmm(c, b) if key[0] == "dense" else torch.bmm(c, torch.bmm(c.transpose(1, 2), b))
            mm = b - cb
            p = (torch.bmm(mm.transpose(1, 2), mm) * torch.bmm(a, a.transpose(1, 2))).sum()
            scaling = members[0][2]
            if scaling != 1.0:
                p = p * (scaling * scaling)
        total = p if total is None else total + p
    return total


def anchored_penalty(bindings: Iterable[AnchorBinding], include_lora_scaling: bool = False,
                     batched: bool = True) -> torch.Tensor | None:
    """`sum_l ||(I - C_l) B_l A_l||_F^2` (times `s_l^2` with `include_lora_scaling`), differentiable.

    Computed in float32 with autocast disabled, whatever the LoRA weights' dtype (bf16 training),
    so the penalty is not quantised away. With `batched` (default), same-shape modules go
    through one batched product per group (`_batched_penalty`); else one module at a time.
    Returns None when there are no bindings.
    """
    if batched:
        return _batched_penalty(list(bindings), include_lora_scaling)
    total: torch.Tensor | None = None
    for bnd in bindings:
        b, a = bnd.target.lora_b, bnd.target.lora_a
        anchor = bnd.anchor_on(b.device)
        with torch.autocast(device_type=b.device.type, enabled=False):
            p = offbasin_penalty(
                b.to(anchor.matrix.dtype),
                a.to(anchor.matrix.dtype),
                anchor,
                bnd.target.scaling if include_lora_scaling else 1.0,
            )
        total = p if total is None else total + p
    return total


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


def lora_targets_summary(bindings: Sequence[AnchorBinding]) -> dict[str, Any]:
    """Counts for logs: modules bound, anchor kinds."""
    kinds = [b.anchor.kind for b in bindings]
    return {"modules": len(bindings), "dense": kinds.count("dense"), "factor": kinds.count("factor")}
