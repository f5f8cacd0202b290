"""Typed validation of configuration dataclasses (pydantic v2, strict mode).

Every config object of the library (`SafetyMergeConfig`, each merge method's parameters,
`SafetyEvalConfig`, `StudyConfig`, the distillation config) is a plain dataclass whose field
annotations carry their constraints (`Annotated[float, Field(gt=0)]`, `Literal[...]`, `bool`).
`validate_dataclass` checks each field against its annotation with pydantic in *strict* mode,
so a YAML `"false"` is not a boolean, `"0.1"` is not a number and NaN/Inf are never numbers,
and raises one `ConfigError` that names the field, the value and what was expected.

pydantic is used through `TypeAdapter` (one per annotation, cached) rather than by turning the
configs into pydantic models: the configs stay ordinary dataclasses (TRL's `SFTConfig`
subclasses must), and the constraints live next to the fields they describe.

Layer 0 (docs/architecture.md): imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from .errors import ConfigError, did_you_mean

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)

#: common constrained types (finite numbers only: NaN and +-Inf are refused everywhere)
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitInterval = Annotated[float, Field(gt=0, le=1)]  # (0, 1]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
FiniteFloat = float


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation, config=_STRICT)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints_cached(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return _HINTS[cls]


def _describe(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
            return f"{value!r} (a quoted string; write it without quotes)"
        except ValueError:
            pass
        if value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return f"{value!r} (a quoted string; write true or false without quotes)"
        return repr(value)
    return repr(value)


def _expected(err: ValidationError) -> str:
    msgs: list[str] = []
    for e in err.errors():
        msg = str(e.get("msg", "invalid"))
        loc = [str(x) for x in e.get("loc", ()) if not str(x).startswith(("function-", "lax-", "json-"))]
        # union members show up as a loc entry naming the member type: drop them
        loc = [x for x in loc if not any(c in x for c in "[]|") and "constrained" not in x
               and x not in ("str", "int", "float", "bool")]
        msg = msg.replace("Input should be", "must be").replace("Input", "value")
        if loc:
            msg = f"item {'/'.join(loc)} {msg}"
        if msg not in msgs:
            msgs.append(msg)
    return " or ".join(msgs)


def check_value(annotation: Any, value: Any, label: str) -> Any:
    """Validate one value against an annotation; returns the (possibly converted) value."""
    try:
        return _adapter(annotation).validate_python(value)
    except ValidationError as e:
        raise ConfigError(f"{label} = {_describe(value)}: {_expected(e)}") from None


def validate_dataclass(
    obj: Any,
    *,
    what: str,
    names: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    overrides: dict[str, Any] | None = None,
) -> None:
    """Check every field of a dataclass instance against its annotation (strict), in place.

    `what` prefixes the error ("config field", "enchtable parameter", ...); `names` restricts the
    check to these fields (e.g. a subclass's own fields), `skip` leaves some out (fields typed
    `Any` are never checked); `overrides` gives constrained annotations for fields whose declared
    type must stay plain (argparse-parsed configs such as TRL's). Converted values (an int given
    for a float field) are written back.
    """
    hints = {**_hints_cached(type(obj)), **(overrides or {})}
    only = set(names) if names is not None else None
    skipped = set(skip)
    for f in dataclasses.fields(obj):
        if (only is not None and f.name not in only) or f.name in skipped:
            continue
        ann = hints.get(f.name, Any)
        if ann is Any:
            continue
        value = getattr(obj, f.name)
        new = check_value(ann, value, f"{what} {f.name!r}")
        if new is not value and not isinstance(value, bool) and type(new) is not type(value):
            object.__setattr__(obj, f.name, new)


def check_known_keys(keys: Iterable[Any], cls: type, what: str, where: str = "") -> set[str]:
    """Refuse a key that is not a field of the dataclass `cls`: one `ConfigError` naming it (`where`
    prefixes the message, e.g. the file), with a guess and the known names; returns the names."""
    names = {f.name for f in dataclasses.fields(cls)}
    for k in keys:
        if k not in names:
            raise ConfigError(f"{where}unknown {what} {k!r}{did_you_mean(str(k), names)}; known: {sorted(names)}")
    return names


def parse_bool(value: Any, label: str) -> bool:
    """A real boolean (YAML true/false), nothing truthy: used for CLI/YAML flags read by hand."""
    return bool(check_value(bool, value, label))


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that `1e-4` and `5E+3` are numbers (YAML 1.1, which PyYAML
    follows, reads exponent notation without a dot as a string; YAML 1.2 and users read it as a
    number). Used for every config file, so strict validation never rejects an unquoted number."""
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=_Loader)
