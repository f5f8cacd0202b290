"""The subspace cache stored with a vector: Delta_s's top singular subspaces, keyed by tensor hash, for EnchTable."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError
from ..io.checkpoints import (
    SafetensorsCheckpoint,
    TensorSource,
)
from .files import SUBSPACE_CACHE, VECTOR_PREFIX

_CACHE_FORMAT = "hf-safety-merge-subspaces/1"
#: fraction of singular triplets stored per matrix; EnchTable's gamma <= this uses the cache
CACHE_GAMMA = 0.5


def _hash_algorithm() -> str:
    """xxh3-128 when the optional `xxhash` package is installed (~10x faster), else sha256."""
    import importlib.util

    return "xxh3_128" if importlib.util.find_spec("xxhash") is not None else "sha256"


def tensor_hash(t: torch.Tensor, algorithm: str = "sha256") -> str | None:
    """Hash of a tensor's values as contiguous float32 (what the merge computes with); None
    when `algorithm` is not available here."""
    import hashlib

    b = t.detach().to("cpu", torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy().data
    if algorithm == "sha256":
        return hashlib.sha256(b).hexdigest()
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            return None
        return str(xxhash.xxh3_128_hexdigest(b))
    return None


def _cache_rank(shape: tuple[int, ...] | torch.Size, gamma: float = CACHE_GAMMA) -> int:
    return math.floor(gamma * min(shape))


def write_subspace_cache(folder: str | os.PathLike[str], source: TensorSource | None = None, *, progress: bool = False,
                         gamma: float = CACHE_GAMMA) -> Path:
    """Compute and store Delta_s's top right singular subspaces (`eigh` of the Gram matrix, in
    float32 where that resolves them, see `fine_terms`, else float64; `floor(gamma * min(m, n))` triplets of every 2-D tensor) beside the vector in
    `folder`, with the sha256 of each tensor they belong to. EnchTable merges read them instead
    of decomposing Delta_s (half of the fine stage's work). Returns the cache file."""
    from safetensors.torch import save_file

    from ..methods.interference import gram_subspace

    folder = Path(folder)
    src = source if source is not None else SafetensorsCheckpoint.open(folder, prefix=VECTOR_PREFIX)
    tensors: dict[str, torch.Tensor] = {}
    hashes: dict[str, str | None] = {}
    algorithm = _hash_algorithm()
    try:
        names = [n for n in src if len(src.meta(n).shape) == 2 and _cache_rank(src.meta(n).shape, gamma) > 0]
        for n in tqdm(names, desc="safety vector subspaces", unit="tensor", disable=not progress):
            d = src.get(n).to(torch.float32)
            sub = gram_subspace(d, _cache_rank(d.shape, gamma), "auto")
            tensors[n + "::s"] = sub.s.contiguous()
            tensors[n + "::v"] = sub.v.to(torch.float32).contiguous()
            hashes[n] = tensor_hash(d, algorithm)
    finally:
        if source is None:
            src.close()
    out = folder / SUBSPACE_CACHE
    tmp = folder / (SUBSPACE_CACHE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": _CACHE_FORMAT, "gamma": repr(gamma), "hash": algorithm,
                                          "hashes": json.dumps(hashes)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


class SubspaceCache:
    """Delta_s's cached top singular subspaces (`subspace_cache.safetensors`), read lazily.

    `get(name, delta)` returns the cached `Subspace` of tensor `name` only if `delta` hashes to
    the value stored with it (xxh3-128 or sha256 of its float32 values, as written) (a vector edited or recomputed after the cache was written is
    decomposed afresh), else None."""

    def __init__(self, path: Path) -> None:
        from ..io.safetensors_stream import read_safetensors_header
        from ..io.tensor_reader import TensorReader

        self.path = path
        self._infos, meta = read_safetensors_header(path)
        if meta.get("format") != _CACHE_FORMAT:
            raise CheckpointError(f"{path}: not a subspace cache of this library version ({meta.get('format')!r})")
        self.gamma = float(meta.get("gamma", "0"))
        self.hashes: dict[str, str] = json.loads(meta.get("hashes", "{}"))
        self.algorithm = meta.get("hash", "sha256")
        self._reader = TensorReader()
        self.hits = 0
        self.misses = 0

    def get(self, name: str, delta: torch.Tensor) -> Any:
        from ..methods.interference import Subspace

        if name not in self.hashes or name + "::v" not in self._infos:
            self.misses += 1
            return None
        digest = tensor_hash(delta, self.algorithm)
        if digest is None or digest != self.hashes[name]:
            self.misses += 1
            return None
        self.hits += 1
        return Subspace(self._reader.read(self._infos[name + "::s"]), self._reader.read(self._infos[name + "::v"]))

    def close(self) -> None:
        self._reader.close()
