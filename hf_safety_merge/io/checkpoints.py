"""Streaming views of checkpoints.

A *tensor source* exposes the names, shapes and dtypes of its tensors from file headers alone,
and reads one tensor at a time on demand. Sources:

- `SafetensorsCheckpoint`: a local folder with `model.safetensors`, or sharded files plus
  `model.safetensors.index.json`, or a single `.safetensors` file (Hub repos are resolved to a
  local snapshot by `hf_safety_merge.io.hub`).
- `PickleCheckpoint`: legacy `pytorch_model*.bin` files, only with an explicit `allow_pickle=True`
  (unpickling can run arbitrary code; loaded with `torch.load(weights_only=True)` regardless).
- `LoraCheckpoint`: a base checkpoint plus a PEFT LoRA adapter, seen as full weights
  `W + scaling * B @ A` computed per tensor on the fly, never materialising the merged model.
- `InMemorySource`: a dict of tensors (tests, small vectors).
"""

from __future__ import annotations

import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .safetensors_stream import TORCH_TO_TAG, TensorInfo, read_safetensors_header
from .tensor_reader import TensorReader


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


# --------------------------------------------------------------------------------------------
# LoRA adapters seen as full weights
# --------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def _pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    """Resolve peft's `rank_pattern` / `alpha_pattern` for a module name.

    Mirrors peft's matching (`peft.utils.other.get_pattern_key`): a key matches when the module
    name ends with it at a `.` boundary (keys are regexes); the first matching key wins.
    """
    for key, value in patterns.items():
        if module == key or re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    scaling: float
    embedding: bool
    fan_in_fan_out: bool

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"


class LoraCheckpoint(TensorSource):
    """A base checkpoint plus a PEFT LoRA adapter, seen as the merged full weights.

    `delta(name)` returns `scaling * B @ A` (transposed for `fan_in_fan_out`, and for embedding
    LoRA), the exact update peft's `merge_and_unload` would add; `get(name)` returns base + delta.
    Scaling is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, with `rank_pattern` and
    `alpha_pattern` resolved per module.
    """

    def __init__(self, base: TensorSource, adapter_dir: str | os.PathLike[str], display: str | None = None) -> None:
        self.base = base
        self.adapter_dir = Path(adapter_dir)
        self.path = base.path
        self.display = display or f"{base.display} + LoRA {self.adapter_dir}"
        cfg_path = self.adapter_dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.adapter_dir}: no adapter_config.json; is this a PEFT adapter folder?")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
        self.adapter_config = cfg
        ptype = str(cfg.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type {ptype!r} is not supported; only LORA adapters are")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported yet; merge them with peft first")
        if cfg.get("lora_bias"):
            raise CheckpointError(f"{cfg_path}: LoRA bias (lora_bias=true) is not supported yet")
        weights = self.adapter_dir / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{self.adapter_dir}: no adapter_model.safetensors (pickle adapter_model.bin is not read)")
        self.adapter = SafetensorsCheckpoint.open(weights)
        r = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", 8))
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))
        base_keys = set(base.keys())
        groups: dict[str, dict[str, str]] = {}
        self._full_replacements: dict[str, str] = {}
        for key in self.adapter:
            m = _LORA_KEY.match(key)
            if m is None:
                if "modules_to_save" in key or not any(s in key for s in ("lora_", "magnitude")):
                    target = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
                    if target in base_keys:
                        self._full_replacements[target] = key
                        continue
                raise CheckpointError(f"{weights}: unexpected adapter tensor {key!r}")
            groups.setdefault(m["module"], {})[m["kind"]] = key
        self.modules: dict[str, LoraModule] = {}
        for module, kinds in groups.items():
            emb = "lora_embedding_A" in kinds
            a = kinds.get("lora_embedding_A" if emb else "lora_A")
            b = kinds.get("lora_embedding_B" if emb else "lora_B")
            if a is None or b is None:
                raise CheckpointError(f"{weights}: module {module!r} has only one of lora_A / lora_B")
            mr = int(_pattern_value(module, rank_pattern, r))
            ma = float(_pattern_value(module, alpha_pattern, alpha))
            scaling = ma / math.sqrt(mr) if rslora else ma / mr
            lm = LoraModule(module, a, b, scaling, emb, fifo)
            if lm.weight_name not in base_keys:
                raise CheckpointError(
                    f"{weights}: LoRA module {module!r} targets {lm.weight_name!r}, which the base "
                    f"checkpoint {base.display} does not have; is the adapter for another model?"
                )
            self._check_shapes(lm, weights)
            self.modules[lm.weight_name] = lm

    def _check_shapes(self, lm: LoraModule, weights: Path) -> None:
        a = self.adapter.meta(lm.a_key).shape
        b = self.adapter.meta(lm.b_key).shape
        w = self.base.meta(lm.weight_name).shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise CheckpointError(f"{weights}: {lm.module}: lora_A {a} and lora_B {b} do not compose")
        prod = (b[0], a[1])
        if lm.embedding or lm.fan_in_fan_out:
            prod = (prod[1], prod[0])
        if prod != w:
            raise CheckpointError(
                f"{weights}: {lm.module}: B @ A has shape {prod} but base weight {lm.weight_name} has {w}"
            )

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def delta(self, name: str) -> torch.Tensor | None:
        """The LoRA update of a base tensor (fp32), or None where the adapter does not touch it."""
        lm = self.modules.get(name)
        if lm is None:
            if name in self._full_replacements:
                return self.adapter.get(self._full_replacements[name]).float() - self.base.get(name).float()
            return None
        a = self.adapter.get(lm.a_key).float()
        b = self.adapter.get(lm.b_key).float()
        d = (b @ a) * lm.scaling
        if lm.embedding or lm.fan_in_fan_out:
            d = d.T
        return d.contiguous()

    def get(self, name: str) -> torch.Tensor:
        w = self.base.get(name)
        if name in self._full_replacements:
            return self.adapter.get(self._full_replacements[name])
        d = self.delta(name)
        if d is None:
            return w
        return (w.float() + d).to(w.dtype)

    def where(self, name: str) -> str:
        return self.base.where(name)

    def close(self) -> None:
        self.base.close()
        self.adapter.close()

    @property
    def config(self) -> dict[str, Any] | None:
        return self.base.config

