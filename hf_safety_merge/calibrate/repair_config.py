"""What `repair` searches: its config (`RepairConfig`, a YAML/JSON file for `hf-safety-merge repair
CONFIG`); the methods it may name are the registered ones with a `scale` (their classes give the
aliases, labels and which vector each merges).

Layer 5 (docs/architecture.md): reads the merge config types (`merge.config`,
`merge.calibration_config`); the search itself is :mod:`.repair`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..merge.calibration_config import CalibrationConfig
from ..merge.config import SafetyMergeConfig
from ..methods.base import canonical_name, get_method_class, method_classes
from ..validation import NonNegativeInt, check_known_keys, validate_dataclass


def repair_methods() -> tuple[str, ...]:
    """What `methods` may name: every registered method with a scale to search (an alias, such as
    ``resta`` for task arithmetic, names its method)."""
    return tuple(c.name for c in method_classes() if c.scale is not None)


def label(method: str) -> str:
    """The name people use for a method ("RESTA"), from its class."""
    cls = get_method_class(method)
    return cls.label or cls.name


def _uses_alignment_vector(method: str) -> bool:
    return get_method_class(method).vector_kind == "alignment"


@dataclass
class RepairConfig:
    """What `repair` searches (a YAML/JSON file for `hf-safety-merge repair CONFIG`).

    Attributes:
        task_model / task_adapter / task_reference: the fine-tune to repair, as in a merge config
            (a full fine-tune with its aligned reference, or a base model with a LoRA adapter).
        safety_vectors: the distilled safety vectors (one path or several; EnchTable is searched
            with each, RESTA / TIES / DARE with the first).
        alignment_vector: ``W_aligned - W_base``, for the methods whose class merges the alignment
            vector (`vector_kind`: Safe LoRA; optional: without it they are skipped with a note).
        methods: the methods to search (default: every registered method with a scale,
            `repair_methods()`; aliases such as ``resta`` name their method).
        parameters: fixed parameters per method (e.g. ``{enchtable: {lam: 5}}``), besides its scale.
        ranges: the search range per method (e.g. ``{enchtable: [0.05, 2]}``; default: the method's
            its class's `scale`, ``hf_safety_merge.calibrate.scales()``).
        calibration: the target, constraints, calibration prompts and probe budget per method
            (:class:`~hf_safety_merge.calibrate.CalibrationConfig`).
        check_harmful / check_benign: prompts of the held-out check of the chosen repair (0: no
            check); taken from the *eval* sides of the calibration sets' splits (the sides reports
            test on), so never from the calibration prompts.
        output_dir / overwrite / device / dtype: as in a merge config.
    """

    task_model: str
    safety_vectors: Sequence[str] | str = ()
    task_adapter: str | None = None
    task_reference: str | None = None
    alignment_vector: str | None = None
    methods: Sequence[str] = field(default_factory=repair_methods)
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranges: dict[str, Sequence[float]] = field(default_factory=dict)
    calibration: dict[str, Any] | CalibrationConfig = field(default_factory=dict)
    check_harmful: NonNegativeInt = 0
    check_benign: NonNegativeInt = 0
    output_dir: str | None = None
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.safety_vectors, str):
            self.safety_vectors = [self.safety_vectors]
        self.safety_vectors = [str(v) for v in self.safety_vectors]
        known = repair_methods()
        self.methods = [canonical_name(m) for m in self.methods]
        validate_dataclass(self, what="repair option")
        for m in self.methods:
            if m not in known:
                raise ConfigError(f"repair method {m!r} is not one of {known} (or 'resta')" + did_you_mean(m, known))
        for m in self.parameters:
            if canonical_name(m) not in known:
                raise ConfigError(f"repair parameters for unknown method {m!r}" + did_you_mean(m, known))
        self.parameters = {canonical_name(k): dict(v) for k, v in self.parameters.items()}
        for m, r in self.ranges.items():
            if canonical_name(m) not in known:
                raise ConfigError(f"repair ranges for unknown method {m!r}" + did_you_mean(m, known))
            if len(r) != 2 or not float(r[0]) < float(r[1]):
                raise ConfigError(f"repair ranges[{m!r}] = {list(r)}: expected [low, high] with low < high")
        self.ranges = {canonical_name(k): (float(v[0]), float(v[1])) for k, v in self.ranges.items()}
        if not self.methods:
            raise ConfigError("repair: `methods` is empty")
        needs_vector = sorted(m for m in self.methods if not _uses_alignment_vector(m))
        if not self.safety_vectors and needs_vector:
            raise ConfigError(f"repair: methods {needs_vector} need `safety_vectors`")
        if self.task_adapter is None and self.task_reference is None:
            raise ConfigError("repair: give `task_reference` (the aligned model a full fine-tune started from) or "
                              "`task_adapter` (a LoRA fine-tune of `task_model`)")
        self.calibration = CalibrationConfig.from_dict(self.calibration)
        if (self.check_harmful or self.check_benign) and not self.calibration.holdout_split:
            raise ConfigError("repair: the held-out check (check_harmful / check_benign) needs `calibration.holdout_split: "
                              "true`: its prompts are the eval sides of the calibration sources' splits")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RepairConfig:
        from ..validation import load_yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"repair config {p} does not exist")
        raw = load_yaml(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of repair options, got {type(raw).__name__}")
        check_known_keys(raw, cls, "repair option", f"{p}: ")
        if "task_model" not in raw:
            raise ConfigError(f"{p}: missing field 'task_model' (the fine-tune to repair)")
        return cls(**{**raw, **{k: v for k, v in overrides.items() if v is not None}})

    def candidates(self) -> list[tuple[str, str]]:
        """(method, vector) pairs in search order."""
        out: list[tuple[str, str]] = []
        for m in self.methods:
            if _uses_alignment_vector(m):
                if self.alignment_vector is not None:
                    out.append((m, self.alignment_vector))
            elif get_method_class(m).closed_form_scale:  # cheap per vector: its terms are computed once
                out += [(m, v) for v in self.safety_vectors]
            else:
                out.append((m, self.safety_vectors[0]))
        return out

    def merge_config(self, method: str, vector: str, output_dir: str | None = None) -> SafetyMergeConfig:
        return SafetyMergeConfig(task_model=self.task_model, task_adapter=self.task_adapter,
                                 task_reference=self.task_reference, safety_vector=vector, method=method,
                                 parameters=dict(self.parameters.get(method, {})), output_dir=output_dir,
                                 overwrite=self.overwrite, device=self.device, dtype=self.dtype)  # type: ignore[arg-type]
