"""The merge-method registry.

A method is a small class around pure tensor functions. The engine streams, per tensor,
`theta_task`, `tau = theta_task - theta_ref` (when `needs_reference`) and the safety vector
`delta`; a method may first see every (tau, delta) pair in a global pass (`needs_global_pass`),
then returns the merged tensor for each. All I/O lives in the engine.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, did_you_mean

_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[MergeMethod]:
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown merge method {name!r}{did_you_mean(name, _REGISTRY)}; available: {available_methods()}"
        )
    return _REGISTRY[name]


def build_method(name: str, parameters: dict[str, Any] | None = None) -> MergeMethod:
    cls = get_method_class(name)
    params = dict(parameters or {})
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    for k in params:
        if k not in fields:
            raise ConfigError(
                f"unknown parameter {k!r} for method {name!r}{did_you_mean(k, fields)}; "
                f"known parameters: {sorted(fields)}"
            )
    try:
        p = cls.Params(**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for method {name!r}: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"method {name!r}: {e}") from None
    return cls(p)


@dataclasses.dataclass
class MethodParams:
    """A method's parameters: each field's annotation states its type and range (checked strictly
    by `validate_dataclass`: YAML strings are not numbers or booleans, NaN/Inf are refused);
    `validate` adds checks across fields."""

    def validate(self) -> None:
        pass

    def __post_init__(self) -> None:
        from ..validation import validate_dataclass

        validate_dataclass(self, what="parameter")
        self.validate()


class MergeMethod(ABC):
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: needs tau = theta_task - theta_reference
    needs_reference: ClassVar[bool] = True
    #: wants to see every (tau, delta) pair before merging
    needs_global_pass: ClassVar[bool] = False
    #: the global pass also wants tau of tensors the safety vector does not cover
    global_pass_all_tensors: ClassVar[bool] = False

    def __init__(self, params: MethodParams) -> None:
        self.params = params
        #: per-tensor diagnostics recorded in the merge report
        self.report: dict[str, dict[str, Any]] = {}
        #: set by the engine before `merge_tensor`: True when `theta_task` is a fresh buffer that
        #: may be overwritten in place (saves an allocation per tensor)
        self.theta_owned = False

    def wants_global_pass(self) -> bool:
        return self.needs_global_pass

    # global pass -----------------------------------------------------------------
    def observe(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor | None) -> None:  # noqa: B027
        """Called once per tensor in the global pass (delta is None outside the vector)."""

    def finish_global(self) -> None:  # noqa: B027
        """Called after the global pass."""

    def summary(self) -> dict[str, Any]:
        """Global quantities for the report (e.g. alpha)."""
        return {}

    # merge -----------------------------------------------------------------------
    @abstractmethod
    def merge_tensor(
        self, name: str, theta_task: torch.Tensor, tau: torch.Tensor | None, delta: torch.Tensor
    ) -> torch.Tensor:
        """Return the merged tensor (fp32) for a tensor covered by the safety vector."""
