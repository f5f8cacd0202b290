"""Model surgery: wrap the chosen blocks of a model in :class:`~.ntk.LinearizedModule`, undo it,
and read the trained difference `theta - theta0` back out.

:func:`linearize_model` finds the decoder layers, picks the blocks a variant trains
(:mod:`.variants`: ``"ffn"``, ``"attn"``, ``"attn_ffn"`` are the EnchTable reference's modes,
``"attn_block"``, ``"attn_block_ffn"`` extensions), wraps them (NTK-linearised, or plain for the
reference's ``"attn"``) and freezes everything else; :func:`unlinearize_model` puts the plain
blocks back with their trained parameters; :func:`delta_tensors` gives the safety vector's tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..errors import ConfigError, did_you_mean
from .ntk import LinearizedModule
from .variants import ATTN_NAMES, MLP_NAMES, VARIANT_BLOCKS, VARIANT_DESCRIPTIONS, resolve_variant


@dataclass
class LinearizationPlan:
    """What :func:`linearize_model` did: the wrapped blocks and the trainable tensors."""

    variant: str
    layers: tuple[int, int]
    num_layers: int
    layers_path: str
    blocks: list[str] = field(default_factory=list)
    #: the subset of `blocks` that runs NTK-linearised (the others train plainly)
    linearized_blocks: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    num_trainable_parameters: int = 0
    num_total_parameters: int = 0
    use_cache_was: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "layers": list(self.layers),
            "num_layers": self.num_layers,
            "layers_path": self.layers_path,
            "description": VARIANT_DESCRIPTIONS.get(self.variant, self.variant),
            "blocks": list(self.blocks),
            "num_linearized_blocks": len(self.linearized_blocks),
            "num_trainable_tensors": len(self.trainable),
            "num_trainable_parameters": self.num_trainable_parameters,
            "num_total_parameters": self.num_total_parameters,
        }

    def tensor_filter(self) -> dict[str, Any]:
        """The equivalent :class:`~hf_safety_merge.io.filters.TensorFilter` (for the vector's card)."""
        from ..io.filters import TensorFilter

        attn, mlp = VARIANT_BLOCKS[self.variant]
        scope = "attention+mlp" if attn and mlp else ("attention" if attn else "mlp")
        return TensorFilter(scope=scope, layers=self.layers, min_ndim=1).to_dict()  # type: ignore[arg-type]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of decoder layers (e.g. `model.layers`), found by structure.

    Prefers a list whose length is `config.num_hidden_layers`; otherwise the longest list whose
    items have an attention or MLP child.
    """
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            first = mod[0]
            kids = {n for n, _ in first.named_children()}
            if kids & set(MLP_NAMES) or kids & set(ATTN_NAMES):
                candidates.append((name, mod))
    if not candidates:
        raise ConfigError(
            f"{type(model).__name__}: no list of decoder layers with an attention "
            f"({', '.join(ATTN_NAMES)}) or MLP ({', '.join(MLP_NAMES)}) child was found"
        )
    exact = [c for c in candidates if n_cfg is not None and len(c[1]) == n_cfg]
    return (exact or sorted(candidates, key=lambda c: -len(c[1])))[0]


def resolve_layer_range(
    num_layers: int, layers: Sequence[int] | None = None, skip_layers: int = 0
) -> tuple[int, int]:
    """`[start, end)` from an explicit range or from `skip_layers = N` (meaning `[N, L - N)`)."""
    if layers is not None and skip_layers:
        raise ConfigError("give either a layer range `layers` or `skip_layers`, not both")
    if layers is not None:
        if len(layers) != 2:
            raise ConfigError(f"layers must be [start, end), got {list(layers)}")
        start, end = int(layers[0]), int(layers[1])
    else:
        if skip_layers < 0:
            raise ConfigError(f"skip_layers must be >= 0, got {skip_layers}")
        start, end = skip_layers, num_layers - skip_layers
    if not (0 <= start < end <= num_layers):
        raise ConfigError(
            f"layer range [{start}, {end}) is empty or outside the model's {num_layers} layers"
            + (f" (skip_layers={skip_layers} leaves nothing)" if layers is None else "")
        )
    return start, end


def _child(layer: nn.Module, names: Sequence[str], what: str, idx: int) -> tuple[str, nn.Module]:
    for n in names:
        mod = getattr(layer, n, None) if n in dict(layer.named_children()) else None
        if isinstance(mod, nn.Module):
            return n, mod
    kids = [n for n, _ in layer.named_children()]
    raise ConfigError(
        f"decoder layer {idx} ({type(layer).__name__}) has no {what} block named one of {list(names)}; "
        f"its children are {kids}{did_you_mean(names[0], kids)} (pass mlp_names/attn_names)"
    )


def linearize_model(
    model: nn.Module,
    variant: str = "ffn",
    *,
    layers: Sequence[int] | None = None,
    skip_layers: int = 0,
    mlp_names: Sequence[str] = MLP_NAMES,
    attn_names: Sequence[str] = ATTN_NAMES,
    linearize: bool = True,
) -> LinearizationPlan:
    """Wrap the chosen blocks of `model` in :class:`LinearizedModule`, in place.

    Every parameter of the model is frozen (`requires_grad=False`) except those of the wrapped
    blocks. Blocks the variant trains plainly (the attention block of ``"attn"`` / ``"attn_ffn"``)
    are wrapped with `linearize=False`: evaluated at `theta` exactly as the plain block (same
    operations, so bitwise the same loss and gradients), the wrapper only keeping `theta0` for the
    delta. With `linearize=False` every block is evaluated plainly (for comparisons).

    Args:
        model: a transformers causal LM (or any model with a list of decoder layers).
        variant: one of :data:`VARIANTS` (see the module docstring): ``"ffn"``, ``"attn"``,
            ``"attn_ffn"`` (the EnchTable reference's modes), ``"attn_block"``,
            ``"attn_block_ffn"`` (extensions; ``"hybrid"`` is a deprecated alias of the latter).
        layers: half-open range `[start, end)` of decoder layers to wrap (default: all).
        skip_layers: `N` wraps layers `[N, L - N)` (EnchTable's layer range); excludes `layers`.
        mlp_names / attn_names: child names under which a layer keeps its blocks.
    """
    variant = resolve_variant(variant)
    if any(isinstance(m, LinearizedModule) for m in model.modules()):
        raise ValueError("model is already linearised; call unlinearize_model first")
    path, layer_list = find_decoder_layers(model)
    start, end = resolve_layer_range(len(layer_list), layers, skip_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    plan = LinearizationPlan(variant=variant, layers=(start, end), num_layers=len(layer_list), layers_path=path)
    attn_mode, mlp_mode = VARIANT_BLOCKS[variant]
    kinds: list[tuple[Sequence[str], str, bool]] = []
    if attn_mode is not None:
        kinds.append((attn_names, "attention", attn_mode == "linearized"))
    if mlp_mode is not None:
        kinds.append((mlp_names, "MLP", mlp_mode == "linearized"))
    for idx in range(start, end):
        layer = cast(nn.Module, layer_list[idx])
        for names, what, lin in kinds:
            child_name, block = _child(layer, names, what, idx)
            wrapper = LinearizedModule(block, linearize=linearize and lin)
            for t in wrapper.theta().values():
                t.requires_grad_(True)
            setattr(layer, child_name, wrapper)
            plan.blocks.append(f"{path}.{idx}.{child_name}")
            if wrapper.linearize:
                plan.linearized_blocks.append(f"{path}.{idx}.{child_name}")
    cfg = getattr(model, "config", None)
    if linearize and attn_mode == "linearized" and cfg is not None:
        # A linearised attention block cannot fill a KV cache: the model must not build one.
        plan.use_cache_was = getattr(cfg, "use_cache", None)
        cfg.use_cache = False
    plan.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    plan.num_trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan.num_total_parameters = sum(p.numel() for p in model.parameters())
    return plan


def linearized_modules(model: nn.Module) -> Iterator[tuple[str, LinearizedModule]]:
    """`(qualified name, wrapper)` for every linearised block of `model`."""
    for name, mod in model.named_modules():
        if isinstance(mod, LinearizedModule):
            yield name, mod


def unlinearize_model(model: nn.Module) -> nn.Module:
    """Put the original blocks back (with their trained parameters), in place; returns `model`.

    The parameters are shared between a wrapper and its block, so the trained values are kept;
    `theta0` is dropped.
    """
    for name, wrapper in list(linearized_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        inner = wrapper.wrapped
        # Re-attach whatever the wrapper holds now (a `.to()` may have replaced parameter objects).
        for n, p in wrapper.named_parameters(recurse=False):
            inner.register_parameter(n, p)
        inner.train(wrapper.training)
        setattr(parent, child, inner)
    return model


@torch.no_grad()
def delta_tensors(model: nn.Module, sign: float = 1.0, round_to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`sign * (theta - theta0)` of every linearised tensor, keyed by full parameter name.

    `sign=-1` gives the safety vector `theta_aligned - theta_harmful` when `theta0` is the aligned
    model and `theta` the trained (harmful) one. Tensors are returned in float32 on the CPU.

    `round_to` (e.g. `torch.bfloat16`) rounds `theta` and `theta0` each to that dtype (round to
    nearest even) before the difference, which is then taken in float32: the vector of two
    checkpoints saved in that dtype, as the EnchTable reference's is (docs/distillation.md).
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, wrapper in linearized_modules(model):
        if round_to is None:
            deltas = wrapper.delta()
        else:
            t0 = wrapper.theta0()
            deltas = {
                n: p.detach().to(round_to).float() - t0[n].to(round_to).float() for n, p in wrapper.theta().items()
            }
        for n, d in deltas.items():
            out[f"{prefix}.{n}"] = (sign * d.float()).cpu().contiguous()
    return out


def theta0_nbytes(model: nn.Module) -> int:
    """Bytes held by the frozen copies `theta0` (the memory overhead of linearisation)."""
    return sum(t.numel() * t.element_size() for _, w in linearized_modules(model) for t in w.theta0().values())
