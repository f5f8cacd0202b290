"""NTK linearisation of transformer blocks with `torch.func`, and EnchTable's training variants.

A :class:`LinearizedModule` wraps a block (a decoder layer's MLP, its attention module, or any
`nn.Module`) and computes the first-order Taylor expansion of the block in its own parameters::

    f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)

with one `torch.func.jvp` over `torch.func.functional_call`: the primal is evaluated at the frozen
copy `theta0`, the tangent is `theta - theta0`. Gradients reach `theta` through the tangent (and
the inputs `x` through both terms), so a plain optimiser on `theta` trains the linearised model.

The variants (:data:`VARIANTS`) follow the EnchTable reference code
(`safety_distillation/LLaMA-Factory/src/llamafactory/train/sft/workflow.py` in AntCPLab/EnchTable,
its `ntk` switch) under the reference's names:

- ``"ffn"``: each MLP block linearised as a whole (reference `ntk='ffn'`);
- ``"attn"``: the attention block's parameters trained *plainly* (reference `ntk='attn'`, its shipped
  choice: it wraps each of q/k/v/o `nn.Linear` on its own, and a Linear is already linear in its
  weight, so its first-order expansion is the Linear itself: plain fine-tuning of the projections);
- ``"attn_ffn"``: both of the above (reference `ntk='attn_ffn'`);

and two extensions that are *not* in the reference, named so:

- ``"attn_block"``: the whole attention block (projections, RoPE, softmax) linearised;
- ``"attn_block_ffn"``: whole attention block and MLP block, each linearised on its own
  (``"hybrid"`` is its deprecated alias).

The wrapper re-registers the wrapped block's children and parameters under their own names, so
the model's parameter names and `state_dict` do not change: a linearised model saves and loads
like the plain one, and `theta0` (one non-persistent buffer per trainable tensor) never reaches a
checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ConfigError, did_you_mean

Variant = Literal["ffn", "attn", "attn_ffn", "attn_block", "attn_block_ffn"]
#: The variants; the first three are the EnchTable reference's `ntk` modes, the last two extensions.
VARIANTS: tuple[str, ...] = ("ffn", "attn", "attn_ffn", "attn_block", "attn_block_ffn")
#: Old names still accepted (with a FutureWarning) and what they mean now.
DEPRECATED_VARIANTS: dict[str, str] = {"hybrid": "attn_block_ffn"}
#: Per variant: how the attention block and the MLP block are trained ("linearized", "plain" or None).
VARIANT_BLOCKS: dict[str, tuple[str | None, str | None]] = {
    "ffn": (None, "linearized"),
    "attn": ("plain", None),
    "attn_ffn": ("plain", "linearized"),
    "attn_block": ("linearized", None),
    "attn_block_ffn": ("linearized", "linearized"),
}
#: One line per variant (recorded in the vector's card).
VARIANT_DESCRIPTIONS: dict[str, str] = {
    "ffn": "MLP blocks NTK-linearised (EnchTable reference ntk='ffn')",
    "attn": "attention projections fine-tuned plainly (EnchTable reference ntk='attn': a linearised "
    "nn.Linear is the Linear itself)",
    "attn_ffn": "attention projections fine-tuned plainly + MLP blocks NTK-linearised (EnchTable reference "
    "ntk='attn_ffn')",
    "attn_block": "whole attention blocks NTK-linearised (extension, not in the EnchTable reference)",
    "attn_block_ffn": "whole attention blocks and MLP blocks NTK-linearised, each on its own (extension, not in "
    "the EnchTable reference)",
}


def resolve_variant(variant: str, *, warn_attn: bool = True) -> str:
    """The canonical variant name; unknown names are a :class:`ConfigError` (with a suggestion).

    ``"hybrid"`` is the deprecated name of ``"attn_block_ffn"`` (FutureWarning). ``"attn"`` changed
    meaning after 0.1.0: it now is the reference's ``ntk='attn'`` (plain fine-tuning of the attention
    projections); the whole-block linearisation it used to mean is ``"attn_block"`` (FutureWarning,
    so that an old config does not silently train something else; `warn_attn=False` leaves that
    warning to a later call).
    """
    name = str(variant)
    if name in DEPRECATED_VARIANTS:
        new = DEPRECATED_VARIANTS[name]
        warnings.warn(
            f"distillation variant {name!r} is deprecated; it is now called {new!r} (whole attention block and MLP "
            f"block, each NTK-linearised: an extension, not the EnchTable reference's 'attn_ffn')",
            FutureWarning,
            stacklevel=3,
        )
        return new
    if name not in VARIANTS:
        known = (*VARIANTS, *DEPRECATED_VARIANTS)
        raise ConfigError(f"variant {name!r} is not one of {VARIANTS}{did_you_mean(name, known)}")
    if name == "attn" and warn_attn:
        warnings.warn(
            "distillation variant 'attn' follows the EnchTable reference (ntk='attn'): plain fine-tuning of the "
            "attention projections, nothing is linearised. In hf-safety-merge 0.1.0 it linearised the whole "
            "attention block; that is now variant 'attn_block'.",
            FutureWarning,
            stacklevel=3,
        )
    return name

#: Child names under which decoder layers keep their MLP / attention block, across architectures.
MLP_NAMES: tuple[str, ...] = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
ATTN_NAMES: tuple[str, ...] = ("self_attn", "attention", "attn", "self_attention")


class LinearizedModule(nn.Module):
    """First-order Taylor expansion of `module` around its current parameters.

    The wrapped module's parameters are the trainable `theta` (shared, not copied); a single frozen
    copy `theta0` is taken at construction and kept as non-persistent buffers. Positional and
    keyword arguments are passed through unchanged (tensors, `None`, tuples such as rotary
    `position_embeddings`, flags): the expansion is taken with respect to the module's own
    parameters only. Every floating-point tensor in the output (a tensor, or a tuple/dict of them
    with `None` or other objects mixed in) is linearised; other outputs are returned as computed
    at `theta0`.

    Attributes that are not parameters, buffers or children (e.g. `layer_idx`, `config`,
    `head_dim`) are looked up on the wrapped module, so code reading them keeps working.

    Args:
        module: the block to linearise.
        linearize: if False, `forward` evaluates the block at `theta` directly (plain training of
            the same parameters; used for comparisons).
    """

    _inner: nn.Module

    def __init__(self, module: nn.Module, linearize: bool = True) -> None:
        super().__init__()
        if isinstance(module, LinearizedModule):
            raise ValueError("module is already linearised")
        # Not registered as a child: its children and parameters are registered on the wrapper
        # directly, so that parameter names (and the state_dict) stay those of the plain model.
        # (`_inner` is set last: attribute fall-through to it must not hide those names.)
        for name, child in module.named_children():
            self.add_module(name, child)
        for name, p in module.named_parameters(recurse=False):
            self.register_parameter(name, p)
        non_persistent: set[str] = getattr(module, "_non_persistent_buffers_set", set())
        for name, b in module.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in non_persistent)
        object.__setattr__(self, "_inner", module)
        self._param_names: list[str] = [n for n, _ in module.named_parameters()]
        if not self._param_names:
            raise ValueError(f"{type(module).__name__} has no parameters to linearise")
        self.linearize = linearize
        self.training = module.training
        for i, (_, p) in enumerate(module.named_parameters()):
            self.register_buffer(f"_theta0_{i}", p.detach().clone(), persistent=False)

    # ------------------------------------------------------------------ plumbing
    @property
    def wrapped(self) -> nn.Module:
        """The original block (its parameters are this wrapper's parameters)."""
        return self._inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_inner")
            if inner is None or name.startswith("_theta0_"):
                raise
            return getattr(inner, name)

    def train(self, mode: bool = True) -> LinearizedModule:
        super().train(mode)
        self._inner.training = mode
        return self

    def theta0(self) -> dict[str, torch.Tensor]:
        """The frozen expansion point, keyed by parameter name relative to the block."""
        return {n: getattr(self, f"_theta0_{i}") for i, n in enumerate(self._param_names)}

    def theta(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, keyed by name relative to the block."""
        params = dict(self.named_parameters())
        return {n: params[n] for n in self._param_names}

    def delta(self) -> dict[str, torch.Tensor]:
        """`theta - theta0` (detached), keyed by name relative to the block."""
        t0 = self.theta0()
        return {n: (p.detach() - t0[n]) for n, p in self.theta().items()}

    @torch.no_grad()
    def reset_expansion_point(self) -> None:
        """Move `theta0` to the current `theta` (the expansion restarts from here)."""
        for n, p in self.theta().items():
            self.theta0()[n].copy_(p)

    def _buffers_for_call(self) -> dict[str, torch.Tensor]:
        return {n: b for n, b in self.named_buffers() if not n.startswith("_theta0_")}

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        buffers = self._buffers_for_call()
        theta = self.theta()
        if not self.linearize:
            return functional_call(self._inner, {**theta, **buffers}, args, kwargs)
        if kwargs.get("past_key_values") is not None or kwargs.get("past_key_value") is not None:
            raise NotImplementedError(
                "a linearised block cannot update a KV cache; call the model with use_cache=False, "
                "or unlinearize it (hf_safety_merge.distill.unlinearize_model) before generating"
            )
        theta0 = self.theta0()
        tangent = {n: theta[n] - theta0[n] for n in self._param_names}
        structure: dict[str, Any] = {}

        def f(params: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
            out = functional_call(self._inner, {**params, **buffers}, args, kwargs)
            leaves, spec = tree_flatten(out)
            lin = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
            other_tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and i not in lin]
            structure["spec"] = spec
            structure["lin"] = lin
            structure["other_tensors"] = other_tensors
            structure["leaves"] = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            return tuple(leaves[i] for i in lin), tuple(leaves[i] for i in other_tensors)

        # Fused attention kernels (flash / memory-efficient, CPU flash) have no forward-mode AD;
        # the math backend of scaled_dot_product_attention is composite and does.
        with sdpa_kernel([SDPBackend.MATH]):
            primal, tangent_out, aux = cast(
                "tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]",
                jvp(f, (theta0,), (tangent,), has_aux=True),
            )
        leaves = list(structure["leaves"])
        for i, p, t in zip(structure["lin"], primal, tangent_out):
            leaves[i] = p + t
        for i, t in zip(structure["other_tensors"], aux):
            leaves[i] = t
        return tree_unflatten(leaves, structure["spec"])

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.theta().values())
        return f"wrapped={type(self._inner).__name__}, linearize={self.linearize}, params={n:,}"


# ---------------------------------------------------------------------------- model surgery
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
