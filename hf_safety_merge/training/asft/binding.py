"""AsFT's LoRA targets and their alignment anchors: find the LoRA layers of a PEFT model, load,
check or build the anchors (`V = W_aligned - W_base` per targeted module), and bind each target to
its anchor."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ...errors import ConfigError, SafetyMergeError
from .anchors import (
    DEFAULT_ANCHORS_FILENAME,
    AlignmentAnchors,
    checkpoint_fingerprint,
    module_key,
    resolve_key,
    same_checkpoint,
)
from .projector import Anchor, ProjectorKind, parse_dtype

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")


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

    def anchor_rows(self, start: int, stop: int, device: torch.device) -> Anchor:
        """The anchor's rows `[start, stop)` (this process's shard of the LoRA B rows under
        FSDP2), on `device`: sliced from a whole anchor once (the whole is then dropped here), or
        checked against a shard loaded as such."""
        try:
            self.anchor = self.anchor.row_slice(start, stop)
        except ValueError as e:
            raise ConfigError(f"AsFT: LoRA module {self.target.name!r}: {e}") from None
        return self.anchor_on(device)


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
    A Hub checkpoint is resolved to its commit now (one metadata request, or the local HF cache's
    record offline; :func:`~hf_safety_merge.io.hub.resolve_commit`) and compared with the commit
    the anchors were built at: a different commit does not match, the same commit matches whatever
    the revision is called. A file without a recorded commit (older versions), or a commit that
    cannot be resolved now, falls back to comparing the revisions, with a warning.
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
        recorded_commit = meta.get(f"{what}_commit")
        current = _current_commit(cached, what, given, rev, recorded_commit) if files is None else None
        if current is not None and recorded_commit is not None:
            if current != recorded_commit:
                at = f" (revision {rev!r})" if rev else ""
                return f"{what} model {str(given)!r} at commit {recorded_commit}, but this run resolves it{at} to commit {current}"
            continue  # the same commit: the same weights, whatever the revision is called
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


def _current_commit(
    cached: AlignmentAnchors, what: str, given: str | os.PathLike[str], rev: str | None, recorded: str | None
) -> str | None:
    """The commit the Hub checkpoint `given` resolves to now, to compare with the `recorded` one;
    None (with a warning saying why the commit cannot be checked) when it is no Hub id, when the
    anchors record no commit (files written before commits were recorded: nothing is requested
    then), or when it cannot be resolved (the caller then compares the revisions)."""
    from ...io.hub import is_repo_id, resolve_commit

    ref = str(given)
    if not is_repo_id(ref):
        return None
    where = cached.meta.get("loaded_from", "the anchors")
    if recorded is None:
        if not (rev is not None and _COMMIT.fullmatch(rev)):  # a pinned commit is exact already
            logger.warning(
                "AsFT: %s records no commit of the %s model %r (written by an older version), so a change to that repo "
                "since the anchors were built cannot be detected; pin its revision to a commit, or rebuild the anchors "
                "to record one", where, what, ref,
            )
        return None
    try:
        return resolve_commit(ref, revision=rev)
    except SafetyMergeError as e:
        logger.warning("AsFT: cannot check that the %s model %r is still at commit %s (the commit %s was built at): %s",
                       what, ref, recorded, where, e)
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
    row_range: Callable[[str, int], tuple[int, int] | None] | None = None,
) -> AlignmentAnchors:
    """Get anchors for `targets`: given, loaded from `anchors` / an existing `cache_path`, or
    streamed from the `aligned` and `base` checkpoints (then written to `cache_path` if given).

    `cache_path` is a safetensors file or a folder (which then holds `asft_anchors.safetensors`;
    an existing empty folder is fine). A cached or given anchors file is checked against this run
    (:func:`anchors_mismatch`: aligned / base checkpoints, their revisions and, for Hub
    checkpoints, the commits they resolve to now, projector, target modules). On a mismatch a
    cache is rebuilt when `on_mismatch="rebuild"` (and the base is known), otherwise a one-line
    :class:`ConfigError` names the field; `rebuild_hint` says how to rebuild in the caller's
    terms. `row_range` (FSDP2: this process's rows of each module) makes a loaded file read only
    those rows (see :meth:`AlignmentAnchors.load`).
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
        got = checked(AlignmentAnchors.load(anchors, row_range=row_range), str(anchors), can_rebuild=False)
        assert got is not None
        return got
    cache_file: Path | None = None
    if cache_path is not None:
        cp = Path(cache_path)
        cache_file = cp / DEFAULT_ANCHORS_FILENAME if (cp.is_dir() or cp.suffix != ".safetensors") else cp
        if cache_file.is_file():
            got = checked(AlignmentAnchors.load(cache_file, row_range=row_range), str(cache_file), can_rebuild=base is not None)
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


def lora_targets_summary(bindings: Sequence[AnchorBinding]) -> dict[str, Any]:
    """Counts for logs: modules bound, anchor kinds."""
    kinds = [b.anchor.kind for b in bindings]
    return {"modules": len(bindings), "dense": kinds.count("dense"), "factor": kinds.count("factor")}
