"""The dual-path safety head: two `Linear(hidden, 1)` heads over mean-pooled U and X+U hidden states."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ...errors import ConfigError
from .config import HEADS_FILE

# -- the dual-path head ---------------------------------------------------------------------------------


class DualPathSafetyHead(nn.Module):
    """Two `Linear(hidden, 1)` heads on mean-pooled final hidden states: over U (`u_head`) and over
    X+U (`xu_head`). `forward` returns `(batch, 2)` logits (U, X+U)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.u_head = nn.Linear(self.hidden_size, 1)
        self.xu_head = nn.Linear(self.hidden_size, 1)

    def reset_parameters(self, seed: int = 0, std: float = 0.02) -> None:
        """Seeded init (its own generator: the global RNG, and so data order, is untouched)."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for lin in (self.u_head, self.xu_head):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
                lin.bias.zero_()

    @staticmethod
    def pool(hidden: torch.Tensor, u_span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of `hidden` `(B, T, H)` over U = `[u_start, u_end)` and over X+U = `[0, u_end)`."""
        t = hidden.shape[1]
        pos = torch.arange(t, device=hidden.device)[None]
        u0, u1 = u_span[:, :1].to(hidden.device), u_span[:, 1:].to(hidden.device)
        xu = (pos < u1).to(hidden.dtype)
        u = xu * (pos >= u0).to(hidden.dtype)
        pooled_u = torch.einsum("bt,bth->bh", u, hidden) / u.sum(1, keepdim=True).clamp(min=1)
        pooled_xu = torch.einsum("bt,bth->bh", xu, hidden) / xu.sum(1, keepdim=True).clamp(min=1)
        return pooled_u, pooled_xu

    def forward(self, hidden: torch.Tensor, u_span: torch.Tensor) -> torch.Tensor:
        w = self.u_head.weight
        pooled_u, pooled_xu = self.pool(hidden.to(w.dtype), u_span)
        return torch.cat([self.u_head(pooled_u), self.xu_head(pooled_xu)], dim=-1)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, theta: float = 0.5) -> torch.Tensor:
        """`theta BCE(U) + (1 - theta) BCE(X+U)`, each averaged over the batch (the reference's
        `head_theta * L_head_C + (1 - head_theta) * L_head_ctx`, default 0.5)."""
        y = labels.to(logits.dtype)[:, None].expand_as(logits)
        per_head = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(0)
        return theta * per_head[0] + (1.0 - theta) * per_head[1]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `safekey_heads.safetensors` into the folder `path` (or to `path` if it ends in `.safetensors`)."""
        from safetensors.torch import save_file

        p = Path(path)
        if p.suffix != ".safetensors":
            p.mkdir(parents=True, exist_ok=True)
            p = p / HEADS_FILE
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(p), metadata={"format": "safekey_dual_path_head", "hidden_size": str(self.hidden_size)})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DualPathSafetyHead:
        from safetensors import safe_open
        from safetensors.torch import load_file

        p = Path(path)
        if p.is_dir():
            p = p / HEADS_FILE
        if not p.is_file():
            raise ConfigError(f"no SafeKey heads at {p}")
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "safekey_dual_path_head":
            raise ConfigError(f"{p} is not a SafeKey heads file (metadata {meta})")
        head = cls(int(meta["hidden_size"]))
        head.load_state_dict(load_file(str(p)))
        return head
