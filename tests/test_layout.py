"""The package's layering (docs/architecture.md), read from its own source with a short AST walk.

What counts as an import of module B by module A: any `import B` / `from B import x` /
`from . import B` / `from .B import x` in A, at module level *or inside a function or class*;
`from pkg import name` counts as an import of `pkg.name` when that is a module, else of `pkg`.
What does not count:
- imports under `if TYPE_CHECKING:` (annotations only; never executed);
- `from hf_safety_merge import __version__` (a string constant: setup.cfg reads it statically
  from the package root, so it has to live there);
- the implicit execution of a parent package's `__init__` when a submodule is imported;
- imports made by name at run time (`importlib.import_module(...)`): the lazy names of `trl`-only
  classes in `training` and the package root, and the old module paths kept reachable as attributes
  (`hf_safety_merge.hub`, ...), which resolve within the same package or downwards.

Rules: (a) no import cycle between modules; (b) no module imports a module of a higher layer
(LAYERS below; a module's layer is that of its longest listed prefix, every module must have
one); (c) compatibility modules (old paths that only re-export, docstring "Compatibility
module:") are for users: nothing in the library imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "hf_safety_merge"
ROOT = Path(__file__).resolve().parent.parent / PKG

#: A module may import modules of its own layer or lower ones, never higher ones.
LAYERS: dict[str, int] = {
    # 0 foundations: import nothing from the package (test fixtures may use the asset paths)
    "errors": 0,
    "validation": 0,
    "assets": 0,
    "testing": 0,
    # 1 bytes: safetensors streaming, checkpoint views, Hub, output folders, the card sink interface
    "io": 1,
    # 2 leaves over io: the merge methods (registry, one pure file per method, their maths);
    #   evaluation and training, which never need the merge engine
    "methods": 2,
    "eval": 2,
    "training": 2,
    # 3 safety vectors: compute, save, load, push
    "vectors": 3,
    # 4 the streaming engine and its declarative config (what wraps it for transformers),
    #   distillation into a vector
    "merge": 4,
    "modeling": 4,
    "distill": 4,
    # 5 sinks and consumers of the engine: cards, calibration and repair, the safety monitor
    "cards": 5,
    "calibrate": 5,
    "monitor": 5,  # the safety monitor (a TrainerCallback); only its patch policy uses the engine
    # 6 product surface: the public package root, CLIs, scripts, the study, the demos
    "": 6,  # the package root (hf_safety_merge/__init__.py)
    "cli": 6,
    "scripts": 6,
    "study": 6,
    "demo": 6,
}

SHIM_MARK = "Compatibility module:"


# ------------------------------------------------------------------------------ the walk
def modules(root: Path, pkg: str) -> dict[str, Path]:
    """Dotted name -> file for every module of the package under `root`."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = [pkg, *p.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _targets(mod: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, known: dict[str, Path], pkg: str) -> set[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join([*base, *([node.module] if node.module else [])])
        else:
            prefix = node.module or ""
        if prefix == pkg and all(a.name == "__version__" for a in node.names):
            return set()
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
    out = set()
    for n in names:
        if n != pkg and not n.startswith(pkg + "."):
            continue
        while n not in known and "." in n:
            n = n.rsplit(".", 1)[0]
        out.add(n)
    return out


def import_graph(root: Path, pkg: str, type_only: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (see the module docstring); with `type_only`,
    the imports under `if TYPE_CHECKING:` count too."""
    known = modules(root, pkg)
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()

        def visit(node: ast.AST, mod: str = mod, is_pkg: bool = is_pkg, edges: set[str] = edges) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child) and not type_only:
                    for sub in child.orelse:
                        visit(sub)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    edges |= _targets(mod, is_pkg, child, known, pkg)
                visit(child)

        visit(ast.parse(path.read_text(), str(path)))
        edges.discard(mod)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def folder_graph(graph: dict[str, set[str]], known: dict[str, Path], pkg: str) -> dict[str, set[str]]:
    """Folder -> the folders its modules import: a module in a folder (at any depth) counts as its
    top-level folder (`eval.judges.learned` -> `eval`); a file at the package root is its own unit."""
    def unit(mod: str) -> str:
        rel = mod.removeprefix(pkg).removeprefix(".")
        top = rel.split(".")[0] if rel else ""
        is_folder = (known[mod].parent != known[pkg].parent) if rel else False
        return f"{pkg}.{top}/" if is_folder else mod
    out: dict[str, set[str]] = {}
    for a, targets in graph.items():
        out.setdefault(unit(a), set()).update(unit(b) for b in targets)
    for k in out:
        out[k].discard(k)
    return out


def layer(mod: str, pkg: str = PKG, layers: dict[str, int] = LAYERS) -> int:
    rel = mod.removeprefix(pkg).removeprefix(".")
    keys = [k for k in layers if k == "" or rel == k or rel.startswith(k + ".")]
    return layers[max(keys, key=len)]


def upward(graph: dict[str, set[str]], pkg: str = PKG, layers: dict[str, int] = LAYERS,
           exempt: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    return [f"{a} (layer {layer(a, pkg, layers)}) imports {b} (layer {layer(b, pkg, layers)})"
            for a in sorted(graph) if a not in exempt for b in sorted(graph[a])
            if layer(b, pkg, layers) > layer(a, pkg, layers)]


def shims(root: Path, pkg: str) -> set[str]:
    out = set()
    for mod, path in modules(root, pkg).items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if doc.startswith(SHIM_MARK):
            out.add(mod)
    return out


# ------------------------------------------------------------------------------ the rules
GRAPH = import_graph(ROOT, PKG)
#: with the imports made for annotations only
FULL_GRAPH = import_graph(ROOT, PKG, type_only=True)
SHIMS = shims(ROOT, PKG)
#: no library file over this many lines (split by concept: docs/architecture.md)
MAX_LINES = 400


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_no_import_cycles_even_for_annotations() -> None:
    assert cycles(FULL_GRAPH) == []


def test_no_cycles_between_folders() -> None:
    assert cycles(folder_graph(FULL_GRAPH, modules(ROOT, PKG), PKG)) == []


def test_no_library_file_over_the_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted(ROOT.rglob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_upward_imports() -> None:
    assert upward(GRAPH, exempt=SHIMS) == []


def test_every_module_has_a_listed_layer() -> None:
    unlisted = [m for m in GRAPH if m != PKG and m not in SHIMS and not any(
        m.removeprefix(PKG + ".") == k or m.removeprefix(PKG + ".").startswith(k + ".") for k in LAYERS if k)]
    assert unlisted == []


def test_docstrings_name_the_right_layer() -> None:
    """A module docstring that says "Layer N" says the layer LAYERS gives it."""
    import re

    wrong = []
    for mod, path in modules(ROOT, PKG).items():
        m = re.search(r"Layer (\d+)", ast.get_docstring(ast.parse(path.read_text())) or "")
        if m and int(m.group(1)) != layer(mod):
            wrong.append(f"{mod}: says layer {m.group(1)}, is {layer(mod)}")
    assert wrong == []


def test_no_compatibility_modules() -> None:
    """Version 0.x keeps no old import paths (CHANGELOG.md names the moves)."""
    assert set() == SHIMS


def test_each_module_says_what_it_is_in_its_first_line() -> None:
    missing = [m for m, p in modules(ROOT, PKG).items()
               if p.read_text().strip() and not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert missing == []


# ------------------------------------------------------------------------------ the checks can fail
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_self_check_a_synthetic_cycle_and_upward_import_are_found(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "def f():\n    from ..high import b  # function level counts\n",
        "high/__init__.py": "",
        "high/b.py": "from ..low.a import f\n",
        "high/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..low import a\n"
                     "from pkg import __version__\n",
    })
    g = import_graph(root, "pkg")
    assert g["pkg.low.a"] == {"pkg.high.b"} and g["pkg.high.b"] == {"pkg.low.a"}
    assert g["pkg.high.c"] == set()  # TYPE_CHECKING and __version__ do not count
    assert import_graph(root, "pkg", type_only=True)["pkg.high.c"] == {"pkg.low.a"}  # unless asked
    assert cycles(g) == [["pkg.high.b", "pkg.low.a"]]
    layers = {"": 9, "low": 0, "high": 1}
    assert upward(g, "pkg", layers) == ["pkg.low.a (layer 0) imports pkg.high.b (layer 1)"]


def test_self_check_folder_cycles_are_found(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    _write(root, {
        "__init__.py": "from .a import x\n",
        "errors.py": "",
        "a/__init__.py": "",
        "a/x.py": "from ..errors import *\nfrom ..b.y import z\n",
        "a/w.py": "",
        "b/__init__.py": "",
        "b/y.py": "z = 1\n",
        "b/v.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a.w import *\n",
    })
    known = modules(root, "pkg")
    assert cycles(import_graph(root, "pkg", type_only=True)) == []  # no circle between modules...
    folders = folder_graph(import_graph(root, "pkg", type_only=True), known, "pkg")
    assert cycles(folders) == [["pkg.a/", "pkg.b/"]]  # ...but one between the folders a/ and b/
    assert "pkg.errors" in folders["pkg.a/"]  # a root file is its own unit, not a folder


def test_self_check_cycle_finder_on_graphs() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("mod, expected", [
    (PKG, 6), (f"{PKG}.io.hub", 1), (f"{PKG}.merge", 4), (f"{PKG}.methods.enchtable", 2),
    (f"{PKG}.merge.engine", 4), (f"{PKG}.merge.config", 4), (f"{PKG}.calibrate.run", 5),
    (f"{PKG}.cli.eval", 6), (f"{PKG}.eval.suite", 2), (f"{PKG}.assets", 0),
])
def test_layer_lookup(mod: str, expected: int) -> None:
    assert layer(mod) == expected
