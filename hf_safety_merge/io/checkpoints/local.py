"""Local checkpoint files: `SafetensorsCheckpoint` (a folder, sharded files with an index, or one
file, seen header-first), `find_safetensors_files`, and `PickleCheckpoint` (legacy `.bin` files,
only with an explicit `allow_pickle=True`).

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...errors import CheckpointError
from ..safetensors_stream import read_safetensors_header
from ..tensor_info import TORCH_TO_TAG, TensorInfo
from ..tensor_reader import TensorReader
from .source import TensorMeta, TensorSource


class SafetensorsCheckpoint(TensorSource):
    """Safetensors files of one checkpoint, inspected from headers only."""

    parallel_reads = True
    mapped_views = True

    def __init__(self, infos: dict[str, TensorInfo], path: Path, display: str) -> None:
        self._infos = infos
        self.path = path
        self.display = display
        self._reader = TensorReader()

    @classmethod
    def open(cls, path: str | os.PathLike[str], prefix: str = "model", display: str | None = None) -> SafetensorsCheckpoint:
        p = Path(path)
        display = display or str(p)
        if p.is_file():
            if p.suffix != ".safetensors":
                raise CheckpointError(f"{p}: expected a .safetensors file or a checkpoint folder")
            infos, _ = read_safetensors_header(p)
            return cls(infos, p.parent, display)
        if not p.is_dir():
            raise CheckpointError(f"{display}: no such file or folder")
        files = find_safetensors_files(p, prefix)
        infos = {}
        index = p / f"{prefix}.safetensors.index.json"
        weight_map: dict[str, str] | None = None
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            missing_files = sorted({f for f in weight_map.values() if not (p / f).is_file()})
            if missing_files:
                raise CheckpointError(f"{index} names shard(s) that are missing from {p}: {missing_files}")
        for f in files:
            file_infos, _ = read_safetensors_header(f)
            for name, info in file_infos.items():
                if name in infos:
                    raise CheckpointError(f"{p}: tensor {name!r} appears in both {infos[name].file.name} and {f.name}")
                infos[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in infos:
                    raise CheckpointError(
                        f"{index}: tensor {name!r} is listed in shard {fname} but that file has no such tensor"
                    )
                if infos[name].file.name != fname:
                    raise CheckpointError(
                        f"{index}: tensor {name!r} is mapped to {fname} but found in {infos[name].file.name}"
                    )
        return cls(infos, p, display)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def meta(self, name: str) -> TensorMeta:
        i = self._infos[name]
        return TensorMeta(i.shape, i.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._reader.read(self._infos[name])

    def view(self, name: str) -> torch.Tensor:
        return self._reader.read(self._infos[name], mapped=True)

    def where(self, name: str) -> str:
        i = self._infos.get(name)
        return str(i.file) if i else self.display

    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    def close(self) -> None:
        self._reader.close()

    def __contains__(self, name: object) -> bool:
        return name in self._infos


def find_safetensors_files(p: Path, prefix: str) -> list[Path]:
    index = p / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        return [p / n for n in names if (p / n).is_file()]
    single = p / f"{prefix}.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(p.glob(f"{prefix}-*-of-*.safetensors"))
    if shards:
        return shards
    any_st = sorted(p.glob("*.safetensors"))
    if any_st and prefix == "model":
        others = [f.name for f in any_st]
        raise CheckpointError(f"{p}: no {prefix}.safetensors or index; found other safetensors files {others}")
    bins = sorted(p.glob("*.bin"))
    if bins:
        raise CheckpointError(
            f"{p}: holds only pickle checkpoints ({', '.join(b.name for b in bins)}). Unpickling can run "
            "arbitrary code, so they are not read by default: convert them to safetensors, or pass "
            "allow_pickle=True (CLI: --allow-pickle) if you trust the source."
        )
    raise CheckpointError(f"{p}: no {prefix}.safetensors weights found")


class PickleCheckpoint(TensorSource):
    """Legacy `.bin` checkpoints, read only when explicitly allowed."""

    def __init__(self, path: Path, display: str) -> None:
        self.path = path
        self.display = display
        index = path / "pytorch_model.bin.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            self._files = sorted({path / f for f in wm.values()})
        else:
            self._files = sorted(path.glob("*.bin"))
        if not self._files:
            raise CheckpointError(f"{path}: no .bin files")
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._where: dict[str, Path] = {}
        for f in self._files:
            sd = self._load(f)
            for k in sd:
                self._where[k] = f
        self._metas = {k: TensorMeta(tuple(self._load(f)[k].shape), TORCH_TO_TAG[self._load(f)[k].dtype]) for k, f in self._where.items()}

    def _load(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._loaded:
            try:
                # weights_only: refuse arbitrary objects; mmap: do not hold all shards in RAM.
                self._loaded[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot load pickle checkpoint ({e})") from e
        return self._loaded[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> TensorMeta:
        return self._metas[name]

    def get(self, name: str) -> torch.Tensor:
        return self._load(self._where[name])[name]

    def where(self, name: str) -> str:
        return str(self._where.get(name, self.display))
