"""Alignment anchors for AsFT: the anchors of a model's LoRA-targeted modules, as one collection.

Layer 2 (docs/architecture.md). One module's anchor `C` (built from `W_aligned - W_base`) and the
penalty maths on it are in :mod:`.projector`; this module holds the collection (:class:`AlignmentAnchors`),
how module names are matched, and the record of which checkpoints it was built from.

Anchors are keyed by *module name* as it appears in the checkpoint (the tensor name without
`.weight`, e.g. ``model.layers.0.self_attn.q_proj``), computed by streaming only the targeted
tensors of the two checkpoints, and cached as one safetensors file (tensors ``<module>.C`` or
``<module>.F`` plus JSON metadata).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, ConfigError, SafetyMergeError, did_you_mean
from .projector import PROJECTORS, Anchor, ProjectorKind, build_anchor, parse_dtype

ANCHORS_FORMAT = "hf-safety-merge/asft-anchors"
ANCHORS_VERSION = "1"
DEFAULT_ANCHORS_FILENAME = "asft_anchors.safetensors"

logger = logging.getLogger(__name__)


def _local_path(ref: str | os.PathLike[str] | None) -> str | None:
    """The resolved absolute path of a local checkpoint reference, or None (a Hub id, or None)."""
    if ref is None:
        return None
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def checkpoint_fingerprint(ref: str | os.PathLike[str] | None) -> dict[str, list[int]] | None:
    """`{file: [size, mtime_ns]}` of a local checkpoint's weight files (None for a Hub id): cheap,
    and it changes when a folder is retrained in place."""
    path = _local_path(ref)
    if path is None:
        return None
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def same_checkpoint(recorded: str | None, recorded_path: str | None, given: str | os.PathLike[str]) -> bool:
    """Whether a checkpoint reference recorded in an anchors file names the `given` one: the same
    string, or the same resolved local path."""
    if recorded is not None and recorded == str(given):
        return True
    here = _local_path(given)
    if here is None:
        return False
    there = recorded_path or _local_path(recorded)
    return there is not None and there == here


def _read_commit(src: Any, ref: str | os.PathLike[str], revision: str | None) -> str | None:
    """The commit an opened checkpoint is read at: a Hub checkpoint is pinned to one when opened;
    offline it is the snapshot the local HF cache holds for `revision` (from its refs/ folder, no
    request). None for a local checkpoint (or, with a warning, when it cannot be told)."""
    from ...io.hub import resolve_commit

    commit = getattr(src, "commit", None)
    if isinstance(commit, str):
        return commit
    try:
        return resolve_commit(ref, revision=revision)
    except SafetyMergeError as e:
        logger.warning("AsFT: cannot tell which commit of %s the anchors are built from, so none is recorded: %s", ref, e)
        return None


# ---------------------------------------------------------------------------------------------
# A collection of anchors: compute from checkpoints, save, load, match module names
# ---------------------------------------------------------------------------------------------


def module_key(name: str) -> str:
    """Normalise a module name: drop PEFT's ``base_model.model.`` wrapper and a ``.weight`` tail."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.removesuffix(".weight")


def resolve_key(name: str, keys: Iterable[str]) -> str | None:
    """Find the key among `keys` naming the same module as `name`: exact match after
    :func:`module_key`, else a unique match on a dotted suffix (``model.language_model.layers.0``
    vs ``model.layers.0`` style wrappers differ only in a prefix)."""
    key = module_key(name)
    pool = {module_key(k): k for k in keys}
    if key in pool:
        return pool[key]
    hits = [orig for norm, orig in pool.items() if norm.endswith("." + key) or key.endswith("." + norm)]
    return hits[0] if len(hits) == 1 else None


@dataclass
class AlignmentAnchors(Mapping[str, Anchor]):
    """Anchors of a set of modules, keyed by module name (checkpoint naming, no ``.weight``).

    Build with :meth:`from_checkpoints`, cache with :meth:`save`, reload with :meth:`load`
    (a local file, a folder holding ``asft_anchors.safetensors``, or a Hub repo id).
    """

    anchors: dict[str, Anchor]
    projector: ProjectorKind = "safe_lora"
    k: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # Mapping protocol
    def __getitem__(self, key: str) -> Anchor:
        return self.anchors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.anchors)

    def __len__(self) -> int:
        return len(self.anchors)

    def get_for(self, module_name: str) -> Anchor | None:
        """The anchor of a (possibly PEFT-wrapped) module name, or None."""
        key = resolve_key(module_name, self.anchors)
        return None if key is None else self.anchors[key]

    @classmethod
    def from_checkpoints(
        cls,
        aligned: str | os.PathLike[str],
        base: str | os.PathLike[str],
        modules: Iterable[str],
        *,
        projector: ProjectorKind = "safe_lora",
        k: int | None = None,
        dtype: str | torch.dtype = "float32",
        transpose: Iterable[str] = (),
        aligned_revision: str | None = None,
        base_revision: str | None = None,
        device: str | torch.device = "cpu",
        progress: Callable[[int, int, str], None] | None = None,
    ) -> AlignmentAnchors:
        """Stream `V = W_aligned - W_base` for the given modules only, one tensor pair at a time.

        Args:
            aligned / base: checkpoint folders, safetensors files or Hub repo ids (via
                :func:`hf_safety_merge.io.hub.open_checkpoint`).
            modules: module names (PEFT-wrapped names are accepted); the weight tensor read is
                ``<module>.weight`` (matched up to a prefix).
            transpose: modules whose weight is stored `in x out` (GPT-2 style `Conv1D`,
                `fan_in_fan_out=True`), so that `V` is taken in the LoRA orientation `out x in`.
            device: where the per-module products/SVDs run (e.g. ``"cuda"`` for big models).
        """
        from ...io.hub import open_checkpoint

        if projector not in PROJECTORS:
            raise ConfigError(f"projector {projector!r} is not one of {PROJECTORS}{did_you_mean(str(projector), PROJECTORS)}")
        if projector == "topk" and (k is None or k < 1):
            raise ConfigError(f"projector 'topk' needs projector rank k >= 1, got {k!r}")
        out_dtype = parse_dtype(dtype)
        modules = list(dict.fromkeys(module_key(m) for m in modules))
        if not modules:
            raise ConfigError("no modules to compute alignment anchors for (no LoRA-targeted modules matched)")
        flip = {module_key(m) for m in transpose}
        src_a = open_checkpoint(aligned, revision=aligned_revision)
        src_b = open_checkpoint(base, revision=base_revision)
        try:
            # the commit each Hub checkpoint is read at: a Hub checkpoint is pinned to one commit
            # when opened; offline it is the snapshot the local HF cache holds for the revision
            # (read from its refs/ folder, no request); None for local checkpoints
            commits = [_read_commit(src, ref, rev) for src, ref, rev in ((src_a, aligned, aligned_revision), (src_b, base, base_revision))]
            keys_a, keys_b = src_a.keys(), src_b.keys()
            weights_a = [k_ for k_ in keys_a if k_.endswith(".weight")]
            weights_b = [k_ for k_ in keys_b if k_.endswith(".weight")]
            # Validate the whole plan from headers before reading one weight.
            plan: list[tuple[str, str, str]] = []
            for mod in modules:
                ta = resolve_key(mod + ".weight", weights_a)
                if ta is None:
                    raise CheckpointError(
                        f"{src_a.display}: no weight for LoRA-targeted module {mod!r} (looked for {mod}.weight)"
                        f"{did_you_mean(mod + '.weight', weights_a)}"
                    )
                tb = resolve_key(ta, weights_b)
                if tb is None:
                    raise CheckpointError(f"{src_b.display}: no tensor {ta!r} (present in the aligned checkpoint {src_a.display})")
                sa, sb = src_a.meta(ta).shape, src_b.meta(tb).shape
                if sa != sb:
                    raise CheckpointError(
                        f"tensor {ta!r}: shape {sa} in {src_a.where(ta)} but {sb} in {src_b.where(tb)}"
                    )
                if len(sa) != 2:
                    raise CheckpointError(f"{src_a.where(ta)}: tensor {ta!r} has shape {sa}; anchors need 2-D weights")
                plan.append((mod, ta, tb))
            anchors: dict[str, Anchor] = {}
            for i, (mod, ta, tb) in enumerate(plan):
                if progress is not None:
                    progress(i, len(plan), mod)
                v = src_a.get(ta).to(device=device, dtype=torch.float32) - src_b.get(tb).to(device=device, dtype=torch.float32)
                if mod in flip:
                    v = v.T
                anchors[mod] = build_anchor(v, projector, k, out_dtype, name=f"{ta} ({src_a.display} - {src_b.display})").to("cpu")
        finally:
            src_a.close()
            src_b.close()
        meta = {
            "aligned": str(aligned),
            "base": str(base),
            # resolved local paths (None for Hub ids), so that "./m" and "/abs/m" compare equal
            "aligned_path": _local_path(aligned),
            "base_path": _local_path(base),
            "aligned_files": checkpoint_fingerprint(aligned),
            "base_files": checkpoint_fingerprint(base),
            "aligned_revision": aligned_revision,
            "base_revision": base_revision,
            # the commits the Hub checkpoints were read at (None for local checkpoints), so that a
            # repo that changed upstream since is noticed even without a pinned revision
            "aligned_commit": commits[0],
            "base_commit": commits[1],
            "dtype": str(out_dtype).removeprefix("torch."),
        }
        return cls(anchors, projector, k if projector == "topk" else None, meta)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write all anchors to one safetensors file (atomic rename); returns the file path."""
        from safetensors.torch import save_file

        if any(a.rows is not None for a in self.anchors.values()):
            raise ValueError("these anchors hold one process's rows only (FSDP2 shards); save the whole anchors instead")
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / DEFAULT_ANCHORS_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}.{'C' if a.kind == 'dense' else 'F'}": a.matrix.contiguous().cpu() for name, a in self.anchors.items()}
        metadata = {
            "format": ANCHORS_FORMAT,
            "version": ANCHORS_VERSION,
            "projector": self.projector,
            "k": "" if self.k is None else str(self.k),
            "v_norms": json.dumps({n: a.v_norm for n, a in self.anchors.items()}),
            "meta": json.dumps(self.meta),
        }
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        projector: ProjectorKind | None = None,
        k: int | None = None,
        row_range: Callable[[str, int], tuple[int, int] | None] | None = None,
    ) -> AlignmentAnchors:
        """Load anchors written by :meth:`save` from a file, a folder or a Hub repo id.

        `projector` / `k`, when given, must match what the file was built with (a cache built for
        another projector is an error, not a silent mismatch). `row_range(module, rows)`, when
        given, names the rows `[start, stop)` of each module's anchor to read (a process's shard
        under FSDP2; None: all of them): only those rows are read from the file.
        """
        from safetensors import safe_open

        from ...io.hub import resolve_checkpoint

        p = Path(path).expanduser()
        if p.is_dir():
            p = p / DEFAULT_ANCHORS_FILENAME
        elif not p.exists():
            ref = str(path)
            filename = DEFAULT_ANCHORS_FILENAME
            if ref.endswith(".safetensors") and ref.count("/") >= 2:  # owner/repo/file.safetensors
                ref, filename = ref.rsplit("/", 1)
            local, _ = resolve_checkpoint(ref, revision=revision, prefix=filename.removesuffix(".safetensors"))
            p = local / filename if local.is_dir() else local
        if not p.is_file():
            raise CheckpointError(f"{p}: no alignment anchors file here")
        try:
            with safe_open(str(p), framework="pt") as f:
                md = f.metadata() or {}
                tensors: dict[str, torch.Tensor] = {}
                spans: dict[str, tuple[int, int, int]] = {}
                for name in f.keys():  # noqa: SIM118 - safe_open API
                    span = None
                    if row_range is not None:
                        sl = f.get_slice(name)
                        total = int(sl.get_shape()[0])
                        span = row_range(name.rsplit(".", 1)[0], total)
                    if span is None:
                        tensors[name] = f.get_tensor(name)
                    else:
                        tensors[name] = sl[span[0] : span[1]]
                        spans[name] = (span[0], span[1], total)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e
        if md.get("format") != ANCHORS_FORMAT:
            raise CheckpointError(f"{p}: not an AsFT anchors file (metadata format={md.get('format')!r}, expected {ANCHORS_FORMAT!r})")
        file_proj = md.get("projector", "safe_lora")
        file_k = int(md["k"]) if md.get("k") else None
        if projector is not None and projector != file_proj:
            raise ConfigError(f"{p}: anchors were built with projector {file_proj!r}, but projector {projector!r} was asked for")
        if projector == "topk" and k is not None and k != file_k:
            raise ConfigError(f"{p}: anchors were built with projector rank k={file_k}, but k={k} was asked for")
        norms = json.loads(md.get("v_norms", "{}"))
        anchors: dict[str, Anchor] = {}
        for name, t in tensors.items():
            m = re.fullmatch(r"(.+)\.([CF])", name)
            if m is None:
                raise CheckpointError(f"{p}: unexpected tensor {name!r} (expected '<module>.C' or '<module>.F')")
            mod, kind = m.group(1), m.group(2)
            anchors[mod] = Anchor(t, "dense" if kind == "C" else "factor", float(norms.get(mod, 0.0)), spans.get(name))
        meta = json.loads(md.get("meta", "{}"))
        meta["loaded_from"] = str(p)
        return cls(anchors, file_proj, file_k, meta)
