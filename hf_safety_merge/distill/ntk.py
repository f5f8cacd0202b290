"""NTK linearisation of one block with `torch.func`: :class:`LinearizedModule`.

A :class:`LinearizedModule` wraps a block (a decoder layer's MLP, its attention module, or any
`nn.Module`) and computes the first-order Taylor expansion of the block in its own parameters::

    f_lin(x; theta) = f(x; theta0) + J_theta f(x; theta0) (theta - theta0)

with one `torch.func.jvp` over `torch.func.functional_call`: the primal is evaluated at the frozen
copy `theta0`, the tangent is `theta - theta0`. Gradients reach `theta` through the tangent (and
the inputs `x` through both terms), so a plain optimiser on `theta` trains the linearised model.

The wrapper re-registers the wrapped block's children and parameters under their own names, so
the model's parameter names and `state_dict` do not change: a linearised model saves and loads
like the plain one, and `theta0` (one non-persistent buffer per trainable tensor) never reaches a
checkpoint. Which blocks of a model are wrapped: :mod:`.linearize`.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten


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
