"""Which tensors a safety vector or a merge covers, decided from names and shapes alone."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import ConfigError, did_you_mean

Scope = Literal["all", "attention", "mlp", "attention+mlp"]
SCOPES = ("all", "attention", "mlp", "attention+mlp")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_ATTN = re.compile(r"(?:^|\.)(?:self_attn|attention|attn|self_attention)\.")
_MLP = re.compile(r"(?:^|\.)(?:mlp|feed_forward|ffn|block_sparse_moe)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass
class TensorFilter:
    """Select tensors by architecture-agnostic name patterns.

    Args:
        scope: "all" (every tensor of `min_ndim` or more dims, embeddings included), "attention"
            (`self_attn.`/`attention.`/`attn.`), "mlp" (`mlp.`/`feed_forward.`/`ffn.`), or both.
        layers: half-open range `[start, end)` of decoder layer indices; tensors outside any
            layer (embeddings, final norm, lm_head) are excluded when a range is given.
        include / exclude: extra regular expressions searched in the tensor name.
        min_ndim: 2 (default) keeps weight matrices only; 1 also keeps norms and biases.
    """

    scope: Scope = "all"
    layers: tuple[int, int] | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    min_ndim: int = 2

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ConfigError(f"tensor filter scope {self.scope!r} is not one of {SCOPES}{did_you_mean(self.scope, SCOPES)}")
        if self.layers is not None:
            if len(self.layers) != 2 or self.layers[0] < 0 or self.layers[1] <= self.layers[0]:
                raise ConfigError(f"tensor filter layers must be [start, end) with 0 <= start < end, got {self.layers}")
            self.layers = (int(self.layers[0]), int(self.layers[1]))
        for pat in [*self.include, *self.exclude]:
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"tensor filter pattern {pat!r} is not a valid regex: {e}") from e

    def __call__(self, name: str, shape: tuple[int, ...]) -> bool:
        if len(shape) < self.min_ndim:
            return False
        if self.scope == "attention" and not _ATTN.search(name):
            return False
        if self.scope == "mlp" and not _MLP.search(name):
            return False
        if self.scope == "attention+mlp" and not (_ATTN.search(name) or _MLP.search(name)):
            return False
        if self.layers is not None:
            idx = layer_index(name)
            if idx is None or not (self.layers[0] <= idx < self.layers[1]):
                return False
        if self.include and not any(re.search(p, name) for p in self.include):
            return False
        return not any(re.search(p, name) for p in self.exclude)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TensorFilter:
        if d is None:
            return cls()
        known = {"scope", "layers", "include", "exclude", "min_ndim"}
        for k in d:
            if k not in known:
                raise ConfigError(f"unknown tensor filter field {k!r}{did_you_mean(k, known)}; known: {sorted(known)}")
        d = dict(d)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)
