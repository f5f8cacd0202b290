"""Offline (and optional online) checks of a card's metadata against the Hub's rules."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def _metadata(card: ModelCard | Any) -> Any:
    m = re.match(r"^---\s*\n(.*?)\n---", card.content, re.S)
    meta = yaml.safe_load(m.group(1)) if m else {}
    return {} if meta is None else meta


def validate_card_metadata(card: ModelCard | Any) -> list[str]:
    """Offline checks of a card's metadata against the Hub's rules (what `ModelCard.validate`
    asks the Hub to check; `validate_card(card, online=True)` asks the Hub itself):
    a YAML mapping that huggingface_hub's `ModelCardData` parses (its `model-index` reader and
    `EvalResult` checks included); `base_model` valid repo id(s); `base_model_relation` one of
    adapter/merge/quantized/finetune and only with a base model; `tags` a list of strings;
    string `library_name`/`license`/`pipeline_tag`. Returns the problems (empty when valid)."""
    from huggingface_hub.repocard_data import ModelCardData

    errors: list[str] = []
    try:
        meta = _metadata(card)
    except yaml.YAMLError as e:
        return [f"metadata is not valid YAML: {e}"]
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    try:  # huggingface_hub's own parsing: model-index -> EvalResult, with its validation
        ModelCardData(**{k: v for k, v in meta.items()})
    except (ValueError, TypeError, KeyError) as e:
        errors.append(f"huggingface_hub rejects the metadata: {str(e).splitlines()[0]}")
    base = meta.get("base_model")
    for b in [base] if isinstance(base, str) else (base or []):
        if not isinstance(b, str) or not _REPO_RE.match(b):
            errors.append(f"base_model {b!r} is not a Hub repo id")
    rel = meta.get("base_model_relation")
    if rel is not None:
        if rel not in _RELATIONS:
            errors.append(f"base_model_relation {rel!r} is not one of {_RELATIONS}")
        if base is None:
            errors.append("base_model_relation is set but base_model is not")
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append("tags must be a list of strings")
    for key in ("library_name", "license", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f"{key} must be a string")
    mi = meta.get("model-index")
    if mi is not None and not (
        isinstance(mi, list) and all(isinstance(x, dict) and "name" in x and isinstance(x.get("results"), list) for x in mi)
    ):
        errors.append("model-index must be a list of {name, results}")
    return errors


def validate_card(card: ModelCard, *, online: bool = False) -> None:
    """Raise `ValueError` if the card's metadata is invalid: offline rules always, and with
    `online=True` also the Hub's own check (`huggingface_hub.ModelCard.validate`)."""
    _check(card)
    if online:
        card.validate()


def _check(card: ModelCard | Any) -> None:
    errors = validate_card_metadata(card)
    if errors:
        raise ValueError(f"card metadata would be invalid: {errors}")
