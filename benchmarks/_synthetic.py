"""Synthetic checkpoints for memory/speed benchmarks: random weights of a real layout, sharded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hf_safety_merge.io.safetensors_stream import OutputTensor, StreamingShardWriter


def write_synthetic(folder: Path, shapes: dict[str, tuple[int, ...]], seed: int, max_shard_size: int | str,
                    prefix: str = "model", config: dict | None = None, scale: float = 0.02) -> Path:
    g = torch.Generator().manual_seed(seed)
    w = StreamingShardWriter(folder, [OutputTensor(n, "F32", s) for n, s in shapes.items()], max_shard_size, prefix=prefix)
    for n, s in shapes.items():
        w.write(n, torch.randn(s, generator=g) * scale)
    w.close()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def mlp_layout(n_layers: int, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n_layers):
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, inter)
    return shapes


def make_vector(folder: Path, shapes: dict[str, tuple[int, ...]], seed: int, max_shard_size: int | str) -> Path:
    write_synthetic(folder, shapes, seed, max_shard_size, prefix="safety_vector", scale=0.001)
    (folder / "safety_vector_config.json").write_text(json.dumps({"architecture": None, "norm": 1.0}))
    return folder
