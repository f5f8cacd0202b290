"""Test fixtures: tiny real checkpoints built offline (random Llama / Qwen2 / Mistral / Gemma configs saved as
safetensors: `models`), tiny chat models with a real tokenizer and chat template (`chat`, `distill`).
Runtime asset paths (data folder, cache, SmolLM2) are in :mod:`hf_safety_merge.assets`.

Layer 0 (docs/architecture.md): imports nothing from the package but `assets`.
"""

from .models import (
    ARCHS,
    make_family,
    make_tiny_model,
    perturb,
    quick_finetune,
    save,
    tiny_config,
    train_steps,
)

__all__ = ["ARCHS", "make_family", "make_tiny_model", "perturb", "quick_finetune", "save", "tiny_config", "train_steps"]
