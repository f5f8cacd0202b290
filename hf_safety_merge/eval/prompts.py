"""Prompt sets: load harmful / benign / task prompts from local files or the Hub, split them
deterministically.

A :class:`PromptSet` is a named list of :class:`PromptItem` (id, text, optional reference answer,
optional metadata).  Sources:

- a local ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` file with a named text column;
- a built-in name resolved in the public data folder (:func:`hf_safety_merge.assets.data_dir`):
  ``advbench``, ``donotanswer``, ``xstest_safe``, ``xstest_unsafe``, ``xstest``; when the file is not
  there (a pip install), its public Hub copy (:data:`HUB_COPIES`) through ``datasets.load_dataset``;
- a Hub data set id (``datasets.load_dataset``), optionally ``hf://owner/name``, when online.

Splits are by a seeded hash of the prompt text, so a row's side never depends on the order of
the file or on other rows, and duplicate texts always land on the same side.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean

__all__ = [
    "BUILTIN_SETS",
    "HUB_COPIES",
    "PromptItem",
    "PromptSet",
    "load_prompts",
    "split_prompts",
]


@dataclass(frozen=True)
class PromptItem:
    """One prompt: a stable ``id``, the ``text``, an optional ``reference`` (for utility tasks:
    the expected answer, or unit tests for code) and free-form ``meta``."""

    id: str
    text: str
    reference: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class PromptSet:
    """A named, ordered collection of prompts."""

    name: str
    items: list[PromptItem]
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[PromptItem]:
        return iter(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    @property
    def texts(self) -> list[str]:
        return [it.text for it in self.items]

    def head(self, n: int | None) -> PromptSet:
        """The first ``n`` prompts (all when ``n`` is None)."""
        if n is None:
            return self
        return PromptSet(self.name, self.items[:n], self.source)

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, n={len(self.items)}, source={self.source!r})"


# name -> (file, column, row filter)
BUILTIN_SETS: dict[str, tuple[str, str, dict[str, str]]] = {
    "advbench": ("advbench.csv", "prompt", {}),
    "donotanswer": ("donotanswer.jsonl", "prompt", {}),
    "xstest": ("xstest_prompts.csv", "prompt", {}),
    "xstest_safe": ("xstest_prompts.csv", "prompt", {"label": "safe"}),
    "xstest_unsafe": ("xstest_prompts.csv", "prompt", {"label": "unsafe"}),
}


#: built-in name -> (its public Hub copy, split, column renames to the built-in's columns): used
#: when the file is not in the data folder (a pip install), cached by `datasets` for offline use
HUB_COPIES: dict[str, tuple[str, str, dict[str, str]]] = {
    "advbench": ("walledai/AdvBench", "train", {}),
    "donotanswer": ("LibrAI/do-not-answer", "train", {"question": "prompt"}),
    "xstest": ("walledai/XSTest", "train", {}),
    "xstest_safe": ("walledai/XSTest", "train", {}),
    "xstest_unsafe": ("walledai/XSTest", "train", {}),
}


def _offline() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        import datasets

        return bool(datasets.config.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover
        return False


def _builtin_from_hub(src: str, path: Path) -> tuple[list[dict[str, Any]], str]:
    """Rows of a built-in set from its public Hub copy (`datasets.load_dataset`, cached)."""
    repo, split, renames = HUB_COPIES[src]
    fname = BUILTIN_SETS[src][0]
    how = (f"set HF_SAFETY_DATA_DIR (or --data-dir) to a folder holding {fname}, or run once online "
           f"`python -c \"import datasets; datasets.load_dataset('{repo}', split='{split}')\"` (cached afterwards), "
           f"or pass a prompt file")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"built-in prompt set {src!r}: {path} does not exist and loading its Hub copy {repo} needs "
                          f"`pip install datasets` (or: {how})") from None
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        cause = ("offline (HF_HUB_OFFLINE=1) and not in the datasets cache" if _offline()
                 else f"not reachable ({type(e).__name__}: {first})")
        raise ConfigError(f"built-in prompt set {src!r}: {path} does not exist and its public copy {repo} is {cause}; "
                          f"{how}") from None
    rows = []
    for r in ds:
        row: dict[str, Any] = {renames.get(str(k), str(k)): v for k, v in dict(r).items()}
        if "label" in row and isinstance(row["label"], str):
            row["label"] = row["label"].strip().lower()
        rows.append(row)
    return rows, f"hf://datasets/{repo}"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
                    if not isinstance(row, dict):
                        raise ConfigError(f"{path}: line {lineno} is not a JSON object")
                    rows.append(row)
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                # {"data": [...]} or column-oriented {"prompt": [...], ...}
                if "data" in data and isinstance(data["data"], list):
                    data = data["data"]
                elif all(isinstance(v, list) for v in data.values()):
                    keys = list(data)
                    data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ConfigError(f"{path}: expected a JSON list of objects")
            return data
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    raise ConfigError(f"{path}: unsupported prompt file type {suffix!r} (use .csv, .tsv, .jsonl or .json)")


def _rows_from_hub(repo_id: str, split: str | None, config: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a declared extra
        raise ConfigError(f"loading {repo_id!r} from the Hub needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(repo_id, config, split=split or "train")
    except Exception as e:
        raise ConfigError(
            f"prompt source {repo_id!r} is neither a local file, a built-in set "
            f"({', '.join(BUILTIN_SETS)}), nor a loadable Hub data set: {e}"
        ) from e
    return [dict(r) for r in ds]


def load_prompts(
    source: str | os.PathLike[str],
    column: str | None = None,
    *,
    name: str | None = None,
    id_column: str | None = None,
    reference_column: str | None = None,
    where: Mapping[str, str] | None = None,
    split: str | None = None,
    config: str | None = None,
    limit: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> PromptSet:
    """Load a prompt set.

    Args:
        source: a file path, a built-in name (see :data:`BUILTIN_SETS`) or a Hub data set id.
        column: the text column (default: ``prompt``, or the built-in set's column).
        name: a display name (default: the built-in name or the file stem).
        id_column: a column holding stable row ids (default: ``id`` if present, else the row index).
        reference_column: a column with the expected answer (utility sets).
        where: keep only rows whose columns equal these values, e.g. ``{"label": "safe"}``.
        split, config: for Hub data sets.
        limit: keep the first ``limit`` rows after filtering.
        data_dir: where built-in names are resolved (default :func:`hf_safety_merge.assets.data_dir`).

    Raises:
        ConfigError: the file or column does not exist, or a row's text is empty.
    """
    src = str(source)
    filt: dict[str, str] = {}
    path = Path(src).expanduser()
    if src in BUILTIN_SETS and not path.exists():
        from ..assets import data_dir as _default_data_dir

        fname, col, filt = BUILTIN_SETS[src]
        root = Path(data_dir) if data_dir is not None else _default_data_dir()
        path = root / fname
        column = column or col
        name = name or src
        if path.is_file():
            rows = _read_rows(path)
            origin = str(path)
        else:  # a pip install: the public Hub copy (datasets cache; works offline once cached)
            rows, origin = _builtin_from_hub(src, path)
    elif path.exists():
        if not path.is_file():
            raise ConfigError(f"prompt source {path} is a directory, not a CSV/JSONL file")
        rows = _read_rows(path)
        name = name or path.stem
        origin = str(path)
    else:
        looks_like_path = src.endswith((".csv", ".tsv", ".jsonl", ".json")) or src.startswith((".", "/", "~"))
        if looks_like_path:
            raise ConfigError(f"prompt file {src} does not exist" + did_you_mean(src, BUILTIN_SETS))
        repo = src.removeprefix("hf://")
        rows = _rows_from_hub(repo, split, config)
        name = name or repo.split("/")[-1]
        origin = f"hf://{repo}"
    column = column or "prompt"
    filt = {**filt, **(where or {})}
    if rows:
        cols = list(rows[0])
        for c in [column, *filt, *(x for x in (id_column, reference_column) if x)]:
            if c not in cols:
                raise ConfigError(f"{origin}: no column {c!r}; columns are {cols}" + did_you_mean(c, cols))
    if id_column is None and rows and "id" in rows[0]:
        id_column = "id"
    items: list[PromptItem] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if any(str(row.get(k)) != str(v) for k, v in filt.items()):
            continue
        text = row.get(column)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{origin}: row {i} has an empty or non-text {column!r} value")
        rid = str(row[id_column]) if id_column else str(i)
        if rid in seen:
            raise ConfigError(f"{origin}: duplicate id {rid!r} in column {id_column!r}")
        seen.add(rid)
        ref = row.get(reference_column) if reference_column else None
        meta = {k: v for k, v in row.items() if k not in (column, reference_column)}
        items.append(PromptItem(rid, text, None if ref is None else str(ref), meta))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        if not rows:
            raise ConfigError(f"{origin}: the prompt set is empty (no rows)")
        raise ConfigError(f"{origin}: no prompts left after keeping only rows with {filt} ({len(rows)} rows before)")
    return PromptSet(name or "prompts", items, origin)


def _rank_key(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{text.strip()}".encode()).hexdigest()


def split_prompts(
    prompts: PromptSet,
    eval_size: int | float = 0.5,
    seed: int = 0,
) -> tuple[PromptSet, PromptSet]:
    """Split a prompt set into ``(train, eval)`` deterministically.

    Rows are ranked by ``sha256(seed, text)``; the first ``eval_size`` distinct texts (a count,
    or a fraction of the distinct texts) form the eval split.  Identical texts always land on the
    same side, so no prompt is both trained on and measured.  Both splits keep file order.
    """
    distinct: list[str] = list(dict.fromkeys(it.text.strip() for it in prompts.items))
    n = len(distinct)
    if isinstance(eval_size, float) and not isinstance(eval_size, bool):
        if not 0.0 < eval_size < 1.0:
            raise ConfigError(f"eval_size fraction must be in (0, 1), got {eval_size}")
        k = round(eval_size * n)
    else:
        k = int(eval_size)
        if not 0 < k < n:
            raise ConfigError(f"eval_size must be in 1..{n - 1} for {prompts.name!r}, got {k}")
    ranked = sorted(distinct, key=lambda t: _rank_key(t, seed))
    eval_texts = set(ranked[:k])
    train = [it for it in prompts.items if it.text.strip() not in eval_texts]
    ev = [it for it in prompts.items if it.text.strip() in eval_texts]
    return (
        PromptSet(f"{prompts.name}-train", train, prompts.source),
        PromptSet(f"{prompts.name}-eval", ev, prompts.source),
    )


def as_prompt_set(obj: PromptSet | Sequence[str] | str | os.PathLike[str], name: str, **kwargs: Any) -> PromptSet:
    """Coerce a prompt set, a list of strings, or a source for :func:`load_prompts`."""
    if isinstance(obj, PromptSet):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return load_prompts(obj, name=kwargs.pop("display_name", None), **kwargs)
    items = [PromptItem(str(i), t) for i, t in enumerate(obj)]
    if not items:
        raise ConfigError(f"prompt set {name!r} is empty")
    return PromptSet(name, items, "<memory>")
