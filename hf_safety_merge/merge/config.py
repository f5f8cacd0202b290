"""`SafetyMergeConfig`: one declarative description of a safety merge (YAML or JSON).

Layer 4 (docs/architecture.md): may import the method registry (`methods.base`), `mergekit_config`, `calibration_config`, `io`, `errors`, `validation`; knows no method code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from ..errors import ConfigError, did_you_mean
from ..validation import load_yaml, validate_dataclass
from .mergekit_config import check_mergekit_keys, is_mergekit_config, mergekit_to_dict

CONFIG_NAME = "safety_merge_config.yaml"
OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: a non-empty string (a path, repo id or revision)
_Ref = Annotated[str, Field(min_length=1)]
#: a Hub repo id ("org/name"), for `base_model` metadata
_RepoId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")]
_PATH_FIELDS = ("task_model", "safety_vector", "task_adapter", "task_reference", "output_dir")


@dataclass
class SafetyMergeConfig:
    """Everything a merge needs, in one object that round-trips through YAML/JSON.

    Attributes:
        task_model: the fine-tuned model (local folder or Hub repo id); with `task_adapter`, the
            base model the LoRA adapter was trained on.
        safety_vector: a safety-vector folder or Hub repo id (see `SafetyVector`).
        task_adapter: optional PEFT LoRA adapter (folder or repo id); the task model is then
            `task_model + adapter`, computed per tensor without materialising it.
        task_reference: the task model before fine-tuning, for `tau = theta_task - theta_ref`.
            Defaults to `task_model` when `task_adapter` is given (tau is then the LoRA update).
        method: a registered method name: enchtable, task_arithmetic, safe_lora, ties, dare.
        parameters: the method's parameters (e.g. `{beta: 0.1, gamma: 0.5, lam: 200}`).
        output_dir: where the patched model folder is written (atomically).
        dtype: output dtype: "auto" keeps each tensor's dtype in the task model.
        max_shard_size: output shard size, e.g. "5GB".
        device: "cpu" or "cuda" (or "cuda:1"): where the per-tensor arithmetic runs.
        *_revision: Hub revisions (branch, tag or commit) of the inputs.
        allow_pickle: read legacy pickle `.bin` checkpoints (unsafe; off by default).
        overwrite: replace a non-empty `output_dir`.
        on_shape_mismatch: "error" (default) refuses a tensor whose shape differs between the task
            model and the safety vector or the reference (e.g. a fine-tune that added tokens);
            "skip" keeps the task model's weights for such tensors, as the EnchTable reference
            does, and names them in `merge_report.json` and the card.
        allow_non_finite: pass NaN/Inf values in the inputs through to the output with a warning
            instead of refusing the merge (off by default: no non-finite model is ever written
            silently).
        push_to_hub / private / create_pr / commit_message: publish the result (see hub docs).
        task_model_hub_id / task_adapter_hub_id / task_reference_hub_id / safety_vector_hub_id:
            the Hub repo id of an input given as a local folder, for the model card's `base_model`
            metadata and "Models merged" section (Hub inputs are named there already).
        vector_aligned_hub_id / vector_reference_hub_id: the same for the two models the safety
            vector was computed from, when its config records local paths.
        license: the card's licence; default: inherited from the task model's card.
        calibration: optional `CalibrationConfig` options (a mapping): pick the method's scale
            against a safety target before merging (`hf-safety-merge merge CONFIG --calibrate`,
            docs/calibration.md).
    """

    task_model: _Ref
    safety_vector: _Ref
    task_adapter: _Ref | None = None
    task_reference: _Ref | None = None
    method: str = "enchtable"
    parameters: dict[str, Any] = field(default_factory=dict)
    output_dir: _Ref | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_shard_size: str | int = "5GB"
    device: str = "cpu"
    task_model_revision: _Ref | None = None
    task_adapter_revision: _Ref | None = None
    task_reference_revision: _Ref | None = None
    safety_vector_revision: _Ref | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    allow_non_finite: bool = False
    on_shape_mismatch: Literal["error", "skip"] = "error"
    push_to_hub: _Ref | None = None
    private: bool = False
    create_pr: bool = False
    commit_message: str | None = None
    task_model_hub_id: _RepoId | None = None
    task_adapter_hub_id: _RepoId | None = None
    task_reference_hub_id: _RepoId | None = None
    safety_vector_hub_id: _RepoId | None = None
    vector_aligned_hub_id: _RepoId | None = None
    vector_reference_hub_id: _RepoId | None = None
    license: _Ref | None = None
    calibration: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field by type and range (strictly: YAML `"false"` is not a boolean), then
        the method and its parameters; raises `ConfigError` naming the field. Opens no file."""
        from ..methods.base import build_method

        for name in _PATH_FIELDS:  # pathlib.Path is welcome where a path is meant
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                setattr(self, name, os.fspath(v))
        for name in ("task_model", "safety_vector"):
            v = getattr(self, name)
            if v is None or v == "":
                raise ConfigError(f"config field {name!r} is required (a local path or Hub repo id), got {v!r}")
        if isinstance(self.dtype, str) and self.dtype not in OUTPUT_DTYPES:
            raise ConfigError(f"config field 'dtype' must be one of {OUTPUT_DTYPES}, got {self.dtype!r}{did_you_mean(str(self.dtype), OUTPUT_DTYPES)}")
        validate_dataclass(self, what="config field")
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"config field 'device' must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        from ..io.safetensors_stream import parse_size

        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"config field 'max_shard_size': {e}") from e
        self.method = build_method(self.method, self.parameters).name  # unknown method / parameter -> ConfigError; an alias -> its name
        if self.calibration is not None:
            from .calibration_config import CalibrationConfig

            scaled = CalibrationConfig.from_dict(self.calibration).scale_for(self.method)[0]
            if scaled == "beta" and self.parameters.get("alpha") is not None:
                raise ConfigError("calibration searches 'beta': remove the fixed 'alpha' from `parameters` (or drop `calibration`)")

    @property
    def reference(self) -> str | None:
        """The effective pre-fine-tuning reference."""
        if self.task_reference is not None:
            return self.task_reference
        return self.task_model if self.task_adapter is not None else None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> SafetyMergeConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        if is_mergekit_config(d):  # merge_method / base_model / models: (see docs/merging.md)
            check_mergekit_keys(d, fields, source)
            d = mergekit_to_dict(d, source)
        for k in d:
            if k not in fields:
                raise ConfigError(f"{source}: unknown config key {k!r}{did_you_mean(k, fields)}; known keys: {sorted(fields)}")
        missing = [k for k in ("task_model", "safety_vector") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SafetyMergeConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        text = p.read_text()
        try:
            data = json.loads(text) if p.suffix == ".json" else load_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{p}: cannot parse ({e})") from e
        return cls.from_dict(data or {}, source=str(p))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".json":
            p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        else:
            p.write_text(self.to_yaml())
        return p

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        return self.save(Path(save_directory) / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> SafetyMergeConfig:
        p = Path(path)
        if p.is_dir():
            for name in (CONFIG_NAME, "safety_merge_config.json"):
                if (p / name).is_file():
                    return cls.from_file(p / name)
            raise ConfigError(f"{p}: no {CONFIG_NAME} in this folder")
        return cls.from_file(p)
