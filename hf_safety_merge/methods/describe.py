"""Plain-text descriptions of the registered merge methods (`hf-safety-merge methods`): the method's
reference, aliases and scale, and each parameter's type, range, default and meaning, all read from the
method class (its `Params` annotations and the `Attributes:` of its docstring).

Layer 2 (docs/architecture.md)."""

from __future__ import annotations


def describe_method(name: str) -> str:
    """A method's full description and every parameter with its type, range, default and
    meaning (from the typed `Params` annotations and the `Attributes:` docstring)."""
    import dataclasses
    import inspect
    import re
    import typing

    from .base import get_method_class

    cls = get_method_class(name)
    doc = inspect.cleandoc(cls.Params.__doc__ or "")
    head, _, attrs = doc.partition("Attributes:")
    meanings: dict[str, str] = {}
    current = None
    for line in attrs.splitlines():
        m = re.match(r"^\s{0,8}(\w+):\s*(.*)$", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls.Params)}:
            current = m.group(1)
            meanings[current] = m.group(2).strip()
        elif current and line.strip():
            meanings[current] += " " + line.strip()
    hints = typing.get_type_hints(cls.Params, include_extras=True)
    lines = [f"{cls.name}: {' '.join(head.split())}"]
    if cls.reference:
        lines.append(f"  reference: {cls.reference}")
    if cls.aliases:
        lines.append(f"  aliases: {', '.join(cls.aliases)}")
    if cls.scale is not None:
        lines.append(f"  calibration scale: {cls.scale[0]}")
    lines.append("  parameters:")
    for f in dataclasses.fields(cls.Params):
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(f"    {f.name}: {_type_text(hints.get(f.name))} = {default!r}")
        meaning = meanings.get(f.name)
        if meaning:
            lines.append(f"        {meaning}")
    return "\n".join(lines)


def _type_text(ann: object) -> str:
    """`float in (0, 100]`, `one of 'all', 'vector'`, `bool or 'auto'`, ... from an annotation."""
    import typing

    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(ann)
        lo = hi = None
        lo_open = hi_open = False
        for m in meta:
            for c in getattr(m, "metadata", []) or [m]:
                for attr, is_lo, opened in (("gt", True, True), ("ge", True, False), ("lt", False, True), ("le", False, False)):
                    v = getattr(c, attr, None)
                    if v is not None:
                        if is_lo:
                            lo, lo_open = v, opened
                        else:
                            hi, hi_open = v, opened
        t = _type_text(base)
        if lo is not None and hi is not None:
            return f"{t} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        if lo is not None:
            return f"{t} {'>' if lo_open else '>='} {lo}"
        if hi is not None:
            return f"{t} {'<' if hi_open else '<='} {hi}"
        return t
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_text(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))
