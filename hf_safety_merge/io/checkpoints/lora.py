"""LoRA adapters seen as full weights: `LoraCheckpoint` is a base checkpoint plus a PEFT LoRA
adapter, `W + scaling * B @ A` computed per tensor on the fly, never materialising the merged model.

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from .local import SafetensorsCheckpoint
from .source import TensorMeta, TensorSource

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
