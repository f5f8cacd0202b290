"""Loading the model under evaluation: `load_model` turns a loaded model or a local folder / Hub
id into ``(model, tokenizer, name)``, with one-line errors for folders that are not models.

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `assets`, `testing` and `io`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", "") or getattr(model, "name_or_path", "")
    return str(name) if name else type(model).__name__


def load_model(
    model: Any,
    tokenizer: Any = None,
    *,
    dtype: str | None = "float32",
    device: str = "cpu",
    revision: str | None = None,
) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` from a loaded model or a local folder / Hub id."""
    if isinstance(model, (str, os.PathLike)):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = str(model)
        local = Path(ref).expanduser()
        if not local.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1 or not ref.strip()):
            raise ConfigError(f"model {ref!r}: no such local folder ({local.resolve()})")
        if local.is_dir() and not (local / "config.json").is_file():
            raise ConfigError(f"model {ref!r}: the folder has no config.json; is it a model folder?")
        if local.is_dir() and tokenizer is None and not any(
            (local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        ):
            raise ConfigError(
                f"model {ref!r}: the folder has no tokenizer (tokenizer.json / tokenizer_config.json); save it with "
                "tokenizer.save_pretrained(folder), or pass tokenizer=..."
            )
        torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else "auto"
        where = "" if local.exists() else f" ({ref!r} is not a local folder; it was read as a Hub repo id)"
        try:
            auto: Any = AutoModelForCausalLM
            m = auto.from_pretrained(ref, dtype=torch_dtype, revision=revision).to(device).eval()
            tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(ref, revision=revision)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load model {ref!r}{where}: {first}") from e
        name = getattr(m.config, "name_or_path", "") or ref
        if Path(ref).exists():
            name = Path(ref).resolve().name
        return m, tok, str(name)
    if tokenizer is None:
        raise ConfigError("a loaded model needs its tokenizer (pass tokenizer=...)")
    return model, tokenizer, _model_name(model)
