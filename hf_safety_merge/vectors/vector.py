"""SafetyVector: compute by streaming two checkpoints, save, load (local or Hub), push.

Layer 3 (docs/architecture.md): its config and the config-vs-files check are in `config`, its
folder's file names in `files`, the EnchTable subspace cache in `subspace_cache`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointError, ConfigError, NonFiniteError, PlanError
from ..io.checkpoints import (
    InMemorySource,
    SafetensorsCheckpoint,
    TensorMeta,
    TensorSource,
)
from ..io.filters import TensorFilter
from ..io.hub import open_checkpoint
from ..io.output import (
    AtomicDir,
    OutputLock,
    check_free_space,
    check_output_dir,
    terminate_as_interrupt,
)
from ..io.safetensors_stream import TORCH_TO_TAG, OutputTensor, StreamingShardWriter
from ..io.sink import card_sink
from ..methods.finite import sq_sum
from .config import SafetyVectorConfig, check_config_matches_files
from .files import SUBSPACE_CACHE, VECTOR_CONFIG, VECTOR_PREFIX
from .subspace_cache import CACHE_GAMMA, SubspaceCache, write_subspace_cache

_STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _version() -> str:
    from .. import __version__

    return __version__


def _bytes_to_write(specs: list[OutputTensor], subspaces: bool) -> int:
    """What a vector folder will take, from the plan alone: the tensors with their header
    entries and, with `subspaces`, the cache (`floor(CACHE_GAMMA * min(m, n))` float32 singular
    values and right singular vectors of length `min(m, n)` per matrix, with a hash each)."""
    total = sum(s.nbytes + len(s.name) + 100 for s in specs)
    if subspaces:
        for s in specs:
            if len(s.shape) == 2:
                k = min(s.shape)
                r = math.floor(CACHE_GAMMA * k)
                if r > 0:
                    total += 4 * r * (k + 1) + 2 * len(s.name) + 300
    return total


class SafetyVector:
    """A (lazily loaded) safety vector.

    Create one with `SafetyVector.compute(aligned, reference, ...)`, load one with
    `SafetyVector.from_pretrained(path_or_repo)`, write it with `save_pretrained(dir)`.
    Tensors are read one at a time with `vector[name]`.
    """

    def __init__(self, source: TensorSource, config: SafetyVectorConfig) -> None:
        self.source = source
        self.config = config
        self._subspaces: SubspaceCache | None = None

    def subspace_cache(self) -> SubspaceCache | None:
        """The cached top singular subspaces stored beside the vector (EnchTable), or None for
        a vector without them (older vectors, in-memory vectors, Hub repos not downloaded with it)."""
        if self._subspaces is None:
            folder = self.source.path
            if folder is not None and (folder / SUBSPACE_CACHE).is_file():
                self._subspaces = SubspaceCache(folder / SUBSPACE_CACHE)
            else:
                from ..io.hub import HubCheckpoint

                # A Hub vector: fetched on first use, after the plan was validated from headers
                # (so a Hub vector merges exactly as its local copy does).
                if isinstance(self.source, HubCheckpoint) and SUBSPACE_CACHE in self.source.remote_files:
                    self._subspaces = SubspaceCache(Path(self.source._download(SUBSPACE_CACHE)))
        return self._subspaces

    # ---------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return self.source.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.source.keys())

    def meta(self, name: str) -> TensorMeta:
        return self.source.meta(name)

    @property
    def norm(self) -> float:
        return self.config.norm

    def close(self) -> None:
        if self._subspaces is not None:
            self._subspaces.close()
            self._subspaces = None
        self.source.close()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"SafetyVector(architecture={c.architecture!r}, tensors={len(self)}, "
            f"parameters={c.num_parameters:,}, norm={c.norm:.4g}, dtype={c.dtype})"
        )

    # ---------------------------------------------------------------- load
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], revision: str | None = None) -> SafetyVector:
        from ..io.hub import HubCheckpoint, open_remote, resolve_checkpoint

        remote = open_remote(str(path), revision=revision, prefix=VECTOR_PREFIX, aux_files=[VECTOR_CONFIG, "README.md"])
        source: TensorSource
        if remote is not None:
            assert isinstance(remote, HubCheckpoint)
            source = remote
            if source.path is None:
                raise CheckpointError(f"{remote.display}: no {VECTOR_CONFIG} in the repo; is it a safety vector repo?")
            folder = source.path
        else:
            local, display = resolve_checkpoint(str(path), revision=revision, prefix=VECTOR_PREFIX,
                                                extra_patterns=[SUBSPACE_CACHE])
            folder = local if local.is_dir() else local.parent
        cfg_file = folder / VECTOR_CONFIG
        if not cfg_file.is_file():
            raise CheckpointError(
                f"{display}: no {VECTOR_CONFIG}; is this a safety vector folder? "
                "(create one with `hf-safety-merge vector compute` or SafetyVector.compute)"
            )
        try:
            cfg = SafetyVectorConfig.from_dict(json.loads(cfg_file.read_text()), str(cfg_file))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e
        if remote is None:
            source = SafetensorsCheckpoint.open(folder, prefix=VECTOR_PREFIX, display=display)
        check_config_matches_files(cfg, source, cfg_file)
        return cls(source, cfg)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: SafetyVectorConfig | None = None) -> SafetyVector:
        cfg = config or SafetyVectorConfig()
        sq = 0.0
        for t in tensors.values():
            sq += sq_sum(t)
        cfg.num_tensors = len(tensors)
        cfg.num_parameters = sum(t.numel() for t in tensors.values())
        cfg.norm = math.sqrt(sq)
        return cls(InMemorySource(tensors), cfg)

    # ---------------------------------------------------------------- compute
    @classmethod
    def compute(
        cls,
        aligned: str | os.PathLike[str] | TensorSource,
        reference: str | os.PathLike[str] | TensorSource,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        tensor_filter: TensorFilter | None = None,
        dtype: str = "float32",
        aligned_revision: str | None = None,
        reference_revision: str | None = None,
        max_shard_size: int | str = "5GB",
        allow_pickle: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        method: str = "difference",
        extra: dict[str, Any] | None = None,
        subspaces: bool = True,
    ) -> SafetyVector:
        """Stream `aligned - reference` over the tensors `tensor_filter` selects.

        Both checkpoints are validated from headers before any weight is read (same names and
        shapes). With `output_dir`, the vector is written there (atomically) and returned as a
        lazily loaded vector; without, it is kept in memory. With `subspaces` (and
        `output_dir`), the top singular subspaces EnchTable needs are stored beside it
        (`write_subspace_cache`).
        """
        if dtype not in _STORE_DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {sorted(_STORE_DTYPES)}")
        tf = tensor_filter or TensorFilter()
        a_src = aligned if isinstance(aligned, TensorSource) else open_checkpoint(aligned, revision=aligned_revision, allow_pickle=allow_pickle)
        r_src = reference if isinstance(reference, TensorSource) else open_checkpoint(reference, revision=reference_revision, allow_pickle=allow_pickle)
        a_cfg, r_cfg = a_src.config or {}, r_src.config or {}
        a_arch = (a_cfg.get("architectures") or [None])[0]
        r_arch = (r_cfg.get("architectures") or [None])[0]
        if a_arch and r_arch and a_arch != r_arch:
            raise PlanError(f"architectures differ: aligned {a_src.display} is {a_arch}, reference {r_src.display} is {r_arch}")
        names = [n for n in a_src if tf(n, a_src.meta(n).shape)]
        if not names:
            raise PlanError(f"the tensor filter {tf.to_dict()} selects no tensor of {a_src.display}")
        for n in names:
            if n not in r_src:
                raise PlanError(f"tensor {n!r} of the aligned model ({a_src.where(n)}) is missing from the reference {r_src.display}")
            sa, sr = a_src.meta(n).shape, r_src.meta(n).shape
            if sa != sr:
                raise PlanError(f"tensor {n!r}: aligned shape {list(sa)} ({a_src.where(n)}) != reference shape {list(sr)} ({r_src.where(n)})")
        store = _STORE_DTYPES[dtype]
        tag = TORCH_TO_TAG[store]
        cfg = SafetyVectorConfig(
            architecture=a_arch,
            model_type=a_cfg.get("model_type"),
            aligned_model=a_src.display,
            aligned_revision=aligned_revision,
            reference_model=r_src.display,
            reference_revision=reference_revision,
            method=method,
            tensor_filter=tf.to_dict(),
            dtype=dtype,
            library_version=_version(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            extra=dict(extra or {}),
        )
        out = Path(output_dir) if output_dir is not None else None
        if out is not None:
            check_output_dir(out, overwrite, inputs=[str(aligned) if not isinstance(aligned, TensorSource) else None,
                                                     str(reference) if not isinstance(reference, TensorSource) else None],
                             hint="pass overwrite=True (CLI: --overwrite) to replace it")
        memory: dict[str, torch.Tensor] = {}
        sq_total = 0.0
        specs = [OutputTensor(n, tag, a_src.meta(n).shape) for n in names]
        what = "safety vector folder"
        try:
            with OutputLock(out, what) if out is not None else nullcontext():
                if out is not None:  # before any tensor is computed (stale temporaries were removed)
                    check_free_space(out, _bytes_to_write(specs, subspaces), what)
                with terminate_as_interrupt(), (AtomicDir(out, overwrite, what) if out is not None else nullcontext()) as atomic:
                    writer = StreamingShardWriter(atomic.path, specs, max_shard_size, prefix=VECTOR_PREFIX) if atomic else None
                    try:
                        for n in tqdm(names, desc="safety vector", unit="tensor", disable=not progress):
                            d = a_src.get(n).float() - r_src.get(n).float()
                            if not torch.isfinite(d).all():
                                raise NonFiniteError(f"tensor {n!r}: aligned - reference has NaN/Inf (check {a_src.where(n)} and {r_src.where(n)})")
                            d = d.to(store)
                            sq = sq_sum(d)
                            sq_total += sq
                            cfg.tensor_norms[n] = math.sqrt(sq)
                            if writer is not None:
                                writer.write(n, d)
                            else:
                                memory[n] = d
                        cfg.num_tensors = len(names)
                        cfg.num_parameters = sum(a_src.meta(n).numel for n in names)
                        cfg.norm = math.sqrt(sq_total)
                        if atomic is None:
                            return cls(InMemorySource(memory, display="<computed>"), cfg)
                        assert writer is not None and out is not None
                        writer.close()
                        writer = None
                        cls(InMemorySource({}), cfg)._write_meta(atomic.path)
                        if subspaces:
                            write_subspace_cache(atomic.path, progress=progress)
                        atomic.commit()
                    finally:
                        if writer is not None:
                            writer.abort()
            assert out is not None
            return cls.from_pretrained(out)
        finally:
            if not isinstance(aligned, TensorSource):
                a_src.close()
            if not isinstance(reference, TensorSource):
                r_src.close()

    # ---------------------------------------------------------------- save
    def _write_meta(self, folder: Path) -> None:
        (folder / VECTOR_CONFIG).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        card_sink().safety_vector_card(self.config).save(folder / "README.md")

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        dtype: str | None = None,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        subspaces: bool = True,
    ) -> Path:
        """Write the vector (safetensors + config + card) to a folder, streaming tensor by tensor;
        with `subspaces`, also the top singular subspaces EnchTable reads (`write_subspace_cache`)."""
        out = check_output_dir(save_directory, overwrite, hint="pass overwrite=True to replace it")
        store = _STORE_DTYPES[dtype] if dtype else None
        names = self.keys()
        specs = [
            OutputTensor(n, TORCH_TO_TAG[store] if store else self.meta(n).dtype, self.meta(n).shape) for n in names
        ]
        what = "safety vector folder"
        with OutputLock(out, what):
            check_free_space(out, _bytes_to_write(specs, subspaces), what)
            with terminate_as_interrupt(), AtomicDir(out, overwrite, what) as atomic:
                writer = StreamingShardWriter(atomic.path, specs, max_shard_size, prefix=VECTOR_PREFIX)
                try:
                    for n in names:
                        t = self[n]
                        writer.write(n, t.to(store) if store else t)
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                if dtype:
                    self.config.dtype = dtype
                self._write_meta(atomic.path)
                if subspaces:
                    write_subspace_cache(atomic.path)
                atomic.commit()
        return out

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        create_pr: bool = False,
        commit_message: str | None = None,
        token: str | None = None,
        dtype: str | None = None,
    ) -> Any:
        """Save to a temporary folder and push it as one commit (or a pull request)."""
        from ..io.hub import push_folder

        with tempfile.TemporaryDirectory() as d:
            folder = Path(d) / "vector"
            self.save_pretrained(folder, dtype=dtype)
            return push_folder(folder, repo_id, private=private, create_pr=create_pr, token=token,
                               commit_message=commit_message or "Upload safety vector with hf-safety-merge")
