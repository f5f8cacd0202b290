"""Tiny real checkpoints (random Llama / Qwen2 / Mistral configs), for tests and the demo.

They are genuine transformers models saved with `save_pretrained` as safetensors, so every
code path (headers, shards, index, config, loading back with `from_pretrained`) is the real one.

Layer 0 (docs/architecture.md): imports nothing from the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "mistral")


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A few-million-parameter config of a real architecture."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "qwen3":  # Qwen3 sets head_dim on its own (default 128)
        common.setdefault("head_dim", common["hidden_size"] // common["num_attention_heads"])
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    return cls(**common)


def make_tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.eval()
    return model


@torch.no_grad()
def perturb(model: Any, scale: float, seed: int, only: str | None = None) -> Any:
    """Add seeded Gaussian noise (relative to each tensor's RMS) to a model's parameters, in place;
    a stand-in for a fine-tuning update, with a realistic low-rank-plus-noise structure."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if only is not None and only not in name:
            continue
        rms = p.float().pow(2).mean().sqrt().clamp_min(1e-3)
        if p.ndim == 2:
            r = max(1, min(p.shape) // 8)
            low = torch.randn(p.shape[0], r, generator=g) @ torch.randn(r, p.shape[1], generator=g) / r**0.5
            noise = 0.7 * low + 0.3 * torch.randn(p.shape, generator=g)
        else:
            noise = torch.randn(p.shape, generator=g)
        p.add_((scale * rms * noise).to(p.dtype))
    return model


def save(model: Any, path: str | os.PathLike[str], max_shard_size: str | int | None = None) -> Path:
    path = Path(path)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path


def make_family(root: str | os.PathLike[str], arch: str = "llama", seed: int = 0, max_shard_size: str | int | None = None) -> dict[str, Path]:
    """Write the four checkpoints of a safety-transfer scenario under `root`:

    - `aligned`: the aligned model (plays theta_aligned and the task model's pre-fine-tuning weights)
    - `harmful`: aligned fine-tuned "on harmful data" (here: a seeded perturbation)
    - `task`: aligned fine-tuned on a downstream task (another perturbation)
    - `base`: the unaligned model the aligned one came from
    """
    root = Path(root)
    base = make_tiny_model(arch, seed)
    paths = {"base": save(base, root / "base", max_shard_size)}
    aligned = perturb(base, 0.05, seed + 1)
    paths["aligned"] = save(aligned, root / "aligned", max_shard_size)
    harmful = perturb(make_tiny_model(arch, seed), 0.05, seed + 1)
    perturb(harmful, 0.04, seed + 2)
    paths["harmful"] = save(harmful, root / "harmful", max_shard_size)
    task = perturb(make_tiny_model(arch, seed), 0.05, seed + 1)
    perturb(task, 0.08, seed + 3)
    paths["task"] = save(task, root / "task", max_shard_size)
    return paths


def train_steps(model: Any, batch: Any, labels: torch.Tensor, steps: int, lr: float, weight_decay: float = 0.01) -> torch.Tensor:
    """`steps` full-batch AdamW steps of causal-LM loss on `labels`, then `model.eval()`; returns
    the last loss (nan for no step)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss


def quick_finetune(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    conversations: list[tuple[str, str]],
    steps: int = 2,
    lr: float = 5e-5,
    seed: int = 0,
) -> Path:
    """A real (tiny) full fine-tune: `steps` AdamW steps of causal-LM loss on chat-formatted
    (prompt, response) pairs, saved with `save_pretrained` (weights + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.train()
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
        for p, r in conversations
    ]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=96)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    train_steps(model, batch, labels, steps, lr)
    out = Path(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
