"""One module's alignment anchor for AsFT (the matrix `C` built from `W_aligned - W_base`) and the
off-basin penalty maths on it.

Layer 2 (docs/architecture.md): imports `errors` only. The collection of a model's anchors
(compute, save, load) is :mod:`.anchors`.

For a weight `W` that LoRA adapts (`W + s B A`, `B: out x r`, `A: r x in`) the *alignment
direction* is `V = W_aligned - W_base` (`out x in`). AsFT (and Safe LoRA before it) uses

- ``"safe_lora"``: `C = V V^T / ||V||_F` (Frobenius norm, *not* squared). This is Safe LoRA's
  matrix; it is symmetric positive semi-definite but not a projector (`C^2 != C`).
- ``"topk"``: `C = U_k U_k^T`, the orthogonal projector onto the top-`k` left singular vectors of
  `V`: a true projector onto the `k` most aligned output directions.

`C` acts on the output side of the update, so the penalty `||(I - C) B A||_F^2` only ever needs
`C B` (`out x r`). An :class:`Anchor` stores whichever representation makes `C B` cheapest:

- ``dense``: `C` itself (`out x out`), `C B` costs `out^2 r`;
- ``factor``: `F` with `C = F F^T` (`out x m`), `C B = F (F^T B)` costs `2 out m r`. For Safe LoRA
  `F = V / sqrt(||V||_F)` (`m = in`), chosen when `in <= out / 2` (e.g. an MLP up projection);
  for the top-`k` projector `F = U_k` (`m = k`), chosen when `k < out / 2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ...errors import CheckpointError, ConfigError, did_you_mean

ProjectorKind = Literal["safe_lora", "topk"]
PROJECTORS: tuple[str, ...] = ("safe_lora", "topk")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str | torch.dtype, field_name: str = "anchor_dtype") -> torch.dtype:
    """`"float32"` -> `torch.float32`, with an error naming the field on a bad value."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"{field_name} {name!r} is not one of {sorted(_DTYPES)}{did_you_mean(key, _DTYPES)}")
    return _DTYPES[key]


@dataclass
class Anchor:
    """The alignment matrix `C` of one module, in its cheapest form for products `C @ B`.

    Attributes:
        matrix: `C` (`out x out`) when `kind == "dense"`, or `F` (`out x m`, `C = F F^T`) when
            `kind == "factor"`.
        kind: ``"dense"`` or ``"factor"``.
        v_norm: `||W_aligned - W_base||_F` of the module (for reports; 0 means no alignment
            signal, `C = 0`, and the whole LoRA update counts as off-basin).
    """

    matrix: torch.Tensor
    kind: Literal["dense", "factor"]
    v_norm: float = 0.0
    #: `(start, stop, total)` when `matrix` holds only rows `[start, stop)` of the module's
    #: `total` output rows (a process's shard under FSDP2); None when it holds them all
    rows: tuple[int, int, int] | None = None

    @property
    def out_features(self) -> int:
        return int(self.matrix.shape[0]) if self.rows is None else self.rows[2]

    def row_slice(self, start: int, stop: int) -> Anchor:
        """Rows `[start, stop)` of this (whole) anchor, copied, so the whole can be freed."""
        if self.rows is not None:
            if self.rows[:2] == (start, stop):
                return self
            raise ValueError(f"anchor holds rows {self.rows[:2]} of {self.rows[2]}, not rows {(start, stop)}")
        total = int(self.matrix.shape[0])
        return Anchor(self.matrix[start:stop].clone(), self.kind, self.v_norm, (start, stop, total))

    def apply(self, b: torch.Tensor) -> torch.Tensor:
        """`C @ b` for `b` of shape `(out, r)`, without forming `C` when stored as a factor."""
        if self.rows is not None:
            raise ValueError("a row shard of an anchor cannot apply C alone (see training.asft.penalty.sharded_penalty_terms)")
        m = self.matrix
        if self.kind == "dense":
            return m @ b
        return m @ (m.transpose(0, 1) @ b)

    def dense(self) -> torch.Tensor:
        """`C` as an `out x out` matrix (tests, reports; not used in training)."""
        if self.kind == "dense":
            return self.matrix
        return self.matrix @ self.matrix.transpose(0, 1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Anchor:
        return Anchor(self.matrix.to(device=device, dtype=dtype), self.kind, self.v_norm, self.rows)


def build_anchor(
    v: torch.Tensor,
    projector: ProjectorKind = "safe_lora",
    k: int | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "<tensor>",
) -> Anchor:
    """Build the :class:`Anchor` of one alignment direction `V = W_aligned - W_base` (`out x in`).

    Computation is done in float64 for accuracy (these are one-off computations) and stored in
    `dtype`.
    """
    if v.ndim != 2:
        raise CheckpointError(f"{name}: alignment anchors need a 2-D weight, got shape {tuple(v.shape)}")
    out_f, in_f = v.shape
    v64 = v.detach().to(torch.float64)
    if not torch.isfinite(v64).all():
        raise CheckpointError(f"{name}: W_aligned - W_base has NaN or Inf values")
    norm = float(torch.linalg.matrix_norm(v64))
    if projector == "safe_lora":
        if norm == 0.0:
            return Anchor(torch.zeros(out_f, 1, dtype=dtype), "factor", 0.0)
        if 2 * in_f <= out_f:  # factor costs 2*out*in*r <= out^2*r and less memory
            return Anchor((v64 / math.sqrt(norm)).to(dtype), "factor", norm)
        return Anchor(((v64 @ v64.T) / norm).to(dtype), "dense", norm)
    if projector == "topk":
        if k is None or k < 1:
            raise ConfigError(f"projector 'topk' needs a rank k >= 1 (got {k!r}) for {name}")
        if norm == 0.0:
            return Anchor(torch.zeros(out_f, 1, dtype=dtype), "factor", 0.0)
        u, s, _ = torch.linalg.svd(v64, full_matrices=False)
        # Drop numerically null directions: a projector only onto what V actually spans.
        keep = int((s > s[0] * max(out_f, in_f) * torch.finfo(torch.float64).eps).sum())
        kk = min(k, keep)
        uk = u[:, :kk]
        if 2 * kk < out_f:
            return Anchor(uk.to(dtype), "factor", norm)
        return Anchor((uk @ uk.T).to(dtype), "dense", norm)
    raise ConfigError(f"projector {projector!r} is not one of {PROJECTORS}{did_you_mean(str(projector), PROJECTORS)}")



# ---------------------------------------------------------------------------------------------
# The penalty: exact cheap form and the naive reference
# ---------------------------------------------------------------------------------------------


def offbasin_penalty(b: torch.Tensor, a: torch.Tensor, anchor: Anchor, scaling: float = 1.0) -> torch.Tensor:
    """`||(I - C) (s B A)||_F^2` in the exact cheap form.

    With `M = B - C B` (`out x r`): `||M A||_F^2 = tr(A^T M^T M A) = sum((M^T M) * (A A^T))`, two
    `r x r` Gram matrices; `C B` comes from :meth:`Anchor.apply`. Never forms an `out x in` or
    `out x out` product. Differentiable in `a` and `b`.
    """
    m = b - anchor.apply(b)
    p = ((m.transpose(0, 1) @ m) * (a @ a.transpose(0, 1))).sum()
    if scaling != 1.0:
        p = p * (scaling * scaling)
    return p


def naive_offbasin_penalty(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """The reference `||(I - C) s B A||_F^2`, forming `B A` and `(I - C)` (tests only)."""
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return (((eye - c) @ (scaling * (b @ a))) ** 2).sum()


def basin_components(b: torch.Tensor, a: torch.Tensor, anchor: Anchor, scaling: float = 1.0) -> dict[str, float]:
    """Norms of the LoRA update `D = s B A` split by the anchor, without forming `D`.

    Returns `total = ||D||`, `in_basin = ||C D||`, `off_basin = ||(I - C) D||` (Frobenius) and
    `cosine = <C D, D> / (||C D|| ||D||)` (Safe LoRA's similarity; 0 when either is zero).
    """
    with torch.no_grad():
        cb = anchor.apply(b)
        m = b - cb
        gram_a = a @ a.transpose(0, 1)
        s2 = scaling * scaling
        total = float(((b.transpose(0, 1) @ b) * gram_a).sum().clamp_min(0)) * s2
        inside = float(((cb.transpose(0, 1) @ cb) * gram_a).sum().clamp_min(0)) * s2
        off = float(((m.transpose(0, 1) @ m) * gram_a).sum().clamp_min(0)) * s2
        dot = float(((cb.transpose(0, 1) @ b) * gram_a).sum()) * s2
    denom = math.sqrt(inside) * math.sqrt(total)
    return {
        "total": math.sqrt(total),
        "in_basin": math.sqrt(inside),
        "off_basin": math.sqrt(off),
        "cosine": dot / denom if denom > 0 else 0.0,
    }
