"""The merge-method registry and interface: a method class is the one place a method is described.

A method is a small class around pure tensor functions. The engine streams, per tensor,
`theta_task`, `tau = theta_task - theta_ref` (when `needs_reference`) and the safety vector
`delta`; a method may first see every (tau, delta) pair in a global pass (`needs_global_pass`),
then returns the merged tensor for each. All I/O lives in the engine.

Besides its maths, the class declares everything the rest of the library says about it: its name
and aliases, its reference, its model-card text, the scale a calibration or repair searches, its
parameters' meanings (the `Attributes:` of its `Params` docstring), its mergekit spellings, and the
settings and knob labels of the Space and the quick demo. Cards, calibration, `methods`, mergekit
configs and the Space read them from here, so a new method is one file (`register` it).

Layer 2 (docs/architecture.md): imports only `errors` and `validation`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, did_you_mean

_REGISTRY: dict[str, type[MergeMethod]] = {}
#: alias -> registered name (e.g. "resta" -> "task_arithmetic")
_ALIASES: dict[str, str] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Register a method class under its `name` and `aliases` (a class decorator)."""
    for key in (cls.name, *cls.aliases):
        owner = _REGISTRY.get(_ALIASES.get(key, key))
        if owner is not None and owner.__qualname__ != cls.__qualname__:
            raise ConfigError(f"merge method name {key!r} is already taken by {owner.__qualname__}")
    _REGISTRY[cls.name] = cls
    for a in cls.aliases:
        _ALIASES[a] = cls.name
    return cls


def unregister(name: str) -> None:
    """Remove a registered method and its aliases (tests, plugins)."""
    cls = _REGISTRY.pop(canonical_name(name), None)
    for a in [a for a, n in _ALIASES.items() if cls is not None and n == cls.name]:
        del _ALIASES[a]


def available_methods() -> list[str]:
    """The registered method names (aliases not included)."""
    return sorted(_REGISTRY)


def method_classes() -> list[type[MergeMethod]]:
    """The registered method classes, by name."""
    return [_REGISTRY[n] for n in available_methods()]


def canonical_name(name: str) -> str:
    """The registered name of a method given by its name or an alias (unknown names unchanged)."""
    return _ALIASES.get(name, name)


def get_method_class(name: str) -> type[MergeMethod]:
    key = canonical_name(name)
    if key not in _REGISTRY:
        known = [*_REGISTRY, *_ALIASES]
        raise ConfigError(
            f"unknown merge method {name!r}{did_you_mean(name, known)}; available: {available_methods()}"
            + (f" (aliases: {sorted(_ALIASES)})" if _ALIASES else "")
        )
    return _REGISTRY[key]


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


@dataclasses.dataclass(frozen=True)
class Knob:
    """A parameter shown as a widget (the Space): its label and slider range; a parameter whose
    type is a choice of strings (`Literal`) is shown as radio buttons and needs no range."""

    label: str
    low: float | None = None
    high: float | None = None
    step: float | None = None


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
    """A merge method. Subclasses set `name` and `Params`, implement `merge_tensor`, and describe
    themselves with the class attributes below; the engine hooks default to no-ops."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: other names accepted in configs and on the command line (e.g. "resta")
    aliases: ClassVar[tuple[str, ...]] = ()
    #: the name people use for it, in reports and tables ("RESTA"); default: `name`
    label: ClassVar[str] = ""
    #: the paper or code the method follows (shown by `methods` and in cards)
    reference: ClassVar[str] = ""
    #: one paragraph for the model card: the formula, in Markdown
    card_text: ClassVar[str] = ""
    #: the vector the method merges: a (distilled) safety vector, or the alignment vector
    #: W_aligned - W_base (Safe LoRA's V); `repair` pairs each method with the right one
    vector_kind: ClassVar[str] = "safety"
    #: the parameter a calibration / repair searches and its default range (lo, hi); for an
    #: integer count, hi = -1 means "every matrix the vector covers". None: no scale to search
    scale: ClassVar[tuple[str, float, float] | None] = None
    #: mergekit `merge_method` spellings read as this method -> the parameters each one fixes
    mergekit_names: ClassVar[dict[str, dict[str, Any]]] = {}
    #: mergekit's `parameters.normalize` for this method (TIES divides by the agreeing count)
    mergekit_normalize: ClassVar[bool] = False
    #: mergekit's per-model parameters -> ours: keys "task.weight", "vector.weight", "density" (one
    #: density for both models). A task weight with no entry must be 1 (the task model kept whole);
    #: a method with none takes its own parameters under the top-level `parameters`
    mergekit_model_parameters: ClassVar[dict[str, str]] = {}
    #: one or two sentences for a UI (the Space), in Markdown
    description: ClassVar[str] = ""
    #: the parameters shown as widgets in the Space, with their label and slider range
    knobs: ClassVar[dict[str, Knob]] = {}
    #: settings for the tiny toy models of `hf_safety_merge.demo` (the Space and `demo --quick`)
    toy_parameters: ClassVar[dict[str, Any]] = {}
    #: probes of a scale search may reuse per-matrix terms computed once, exactly (EnchTable: the
    #: interference terms (a, b) with ||M||_1 = alpha a + b); others re-run their formula per probe
    closed_form_scale: ClassVar[bool] = False
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

    @classmethod
    def has_hook(cls, hook: str) -> bool:
        """Whether this class overrides the engine hook `hook` (the engine skips the worker threads
        of hooks a method leaves as no-ops)."""
        return getattr(cls, hook) is not getattr(MergeMethod, hook)

    # engine hooks (no-ops unless overridden) -----------------------------------------
    def use_vector(self, vector: Any) -> None:  # noqa: B027
        """Called with the opened safety vector before any pass (EnchTable: its subspace cache)."""

    def prepare_global(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> None:  # noqa: B027
        """The global pass's share of one (tau, delta) pair, run on a worker thread (EnchTable: the
        squared norms behind alpha); `observe` then runs on the main thread, in tensor order."""

    def observed_in_prepare_global(self, name: str) -> bool:
        """Whether `prepare_global` took all that `observe` needs from `name` (the engine then
        holds none of its tensors for the main thread)."""
        return False

    def prepare(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> None:  # noqa: B027
        """The scale-independent per-tensor work of the merge pass, run on worker threads ahead of
        `merge_tensor` (EnchTable: the decompositions)."""

    def is_prepared(self, name: str) -> bool:
        """Whether `prepare` already did the per-tensor work for `name` (`merge_tensor` then needs
        no tau)."""
        return False

    # a scale search in closed form (`closed_form_scale`; calibration and repair) ----------
    def scale_terms(self, name: str, tau: torch.Tensor | None, delta: torch.Tensor) -> tuple[Any, dict[str, Any]] | None:
        """The scale-independent terms of one tensor (and their report entry), computed once for
        every probe of a scale search; None: the tensor needs none."""
        return None

    def merge_with_terms(self, theta_task: torch.Tensor, delta: torch.Tensor, terms: Any,
                         norm_ratio: float) -> tuple[torch.Tensor, float | None]:
        """The merged tensor at this instance's scale from `scale_terms` (None when the tensor had
        none) and `norm_ratio` = ||tau|| / ||Delta_s||; second: the tensor's weight, if any."""
        raise NotImplementedError(f"{self.name} has no closed-form scale (closed_form_scale is False)")

    def closed_form_summary(self, norm_ratio: float, weights: list[float]) -> dict[str, Any]:
        """The summary of a closed-form probe (like `summary` after a merge)."""
        return {}

    def with_terms(self, terms: dict[str, Any], info: dict[str, dict[str, Any]]) -> MergeMethod:
        """This method, with its per-tensor terms already known (the final streaming merge after a
        scale search reuses them instead of computing them again)."""
        return self

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
