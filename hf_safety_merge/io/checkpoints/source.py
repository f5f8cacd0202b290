"""The tensor-source interface: `TensorMeta` (shape and dtype from a header), the abstract
`TensorSource` every checkpoint view implements, and `InMemorySource` (a dict of tensors).

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ..tensor_info import TORCH_TO_TAG


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # safetensors tag

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorSource(ABC):
    """A read-only, lazily loaded collection of named tensors."""

    #: human-readable id used in error messages (a path or repo id)
    display: str = "<tensors>"
    #: the folder holding the files, when there is one
    path: Path | None = None
    #: whether `get` / `view` may be called from several threads at once (local files: positional
    #: reads; a Hub source downloads lazily, a LoRA source computes)
    parallel_reads: bool = False
    #: whether `view` hands out a memory map of the file (no copy, no fresh pages) rather than
    #: `get`'s copy: a merge pass then copies from the map into reused buffers (`BufferPool`)
    mapped_views: bool = False

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def meta(self, name: str) -> TensorMeta: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    def view(self, name: str) -> torch.Tensor:
        """`get(name)` for a caller that only reads the tensor: a source may then hand out a
        memory map of the file instead of a copy (writing to it still never touches the file)."""
        return self.get(name)

    def where(self, name: str) -> str:
        """Where a tensor lives, for error messages."""
        return self.display

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __contains__(self, name: object) -> bool:
        return name in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def config(self) -> dict[str, Any] | None:
        """The `config.json` next to the weights, if any."""
        if self.path is None:
            return None
        cfg = self.path / "config.json"
        if not cfg.is_file():
            return None
        try:
            data = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg}: invalid JSON ({e})") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{cfg}: expected a JSON object of model settings, got a JSON {type(data).__name__}")
        return data


class InMemorySource(TensorSource):
    def __init__(
        self, tensors: Mapping[str, torch.Tensor], display: str = "<in-memory>", config: dict[str, Any] | None = None
    ) -> None:
        self._t = dict(tensors)
        self.display = display
        self._config = config

    @property
    def config(self) -> dict[str, Any] | None:
        return self._config

    def keys(self) -> list[str]:
        return list(self._t)

    def meta(self, name: str) -> TensorMeta:
        t = self._t[name]
        return TensorMeta(tuple(t.shape), TORCH_TO_TAG[t.dtype])

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]
