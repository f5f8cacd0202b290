"""The config of a safety vector (`safety_vector_config.json`): its provenance and statistics, and
the check that it lists exactly the tensors the vector's files hold.

Layer 3 (docs/architecture.md): imports `errors` and `io.checkpoints` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, did_you_mean
from ..io.checkpoints import TensorSource
from .files import VECTOR_CONFIG


@dataclass
class SafetyVectorConfig:
    """Provenance and statistics of a safety vector (`safety_vector_config.json`)."""

    architecture: str | None = None
    model_type: str | None = None
    aligned_model: str | None = None
    aligned_revision: str | None = None
    reference_model: str | None = None
    reference_revision: str | None = None
    method: str = "difference"
    tensor_filter: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    num_tensors: int = 0
    num_parameters: int = 0
    norm: float = 0.0
    tensor_norms: dict[str, float] = field(default_factory=dict)
    library_version: str = ""
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = VECTOR_CONFIG) -> SafetyVectorConfig:
        known = set(cls.__dataclass_fields__)
        for k in d:
            if k not in known:
                raise ConfigError(f"{source}: unknown field {k!r}{did_you_mean(k, known)}")
        return cls(**d)


def check_config_matches_files(cfg: SafetyVectorConfig, source: TensorSource, cfg_file: Path) -> None:
    """The tensors `safety_vector_config.json` lists are exactly the tensors the files hold."""
    listed, held = set(cfg.tensor_norms), set(source.keys())
    if not listed and not cfg.num_tensors:
        return  # a hand-written config without statistics: nothing to compare
    missing, extra = sorted(listed - held), sorted(held - listed)
    if missing or (listed and extra):
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) it lists are missing from the files: {_names(missing)}")
        if extra:
            parts.append(f"the files hold {len(extra)} tensor(s) it does not list: {_names(extra)}")
        source.close()
        raise CheckpointError(f"{cfg_file}: the safety vector's config and its safetensors files disagree: "
                              f"{'; '.join(parts)}; the vector is incomplete or was edited: recompute it")
    if not listed and cfg.num_tensors != len(held):
        source.close()
        raise CheckpointError(f"{cfg_file}: num_tensors is {cfg.num_tensors} but the files hold {len(held)} tensors; "
                              "the vector is incomplete or was edited: recompute it")


def _names(names: list[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")
