"""NTK linearisation of whole blocks: Taylor expansion, identity at theta0, trainable tensors; the
EnchTable reference's variants (`attn` = plain fine-tuning of the projections, `ffn` linearised)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from hf_safety_merge.distill.linearize import (
    delta_tensors,
    linearize_model,
    linearized_modules,
    resolve_layer_range,
    theta0_nbytes,
    unlinearize_model,
)
from hf_safety_merge.distill.ntk import LinearizedModule
from hf_safety_merge.distill.variants import VARIANT_BLOCKS, VARIANTS
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.testing.models import make_tiny_model

ARCHS = ["llama", "qwen2"]


def _block_inputs(model: torch.nn.Module, layer: int, seq: int = 7, batch: int = 2) -> dict:
    """Inputs of decoder layer `layer`'s blocks, captured from a real forward pass."""
    captured: dict = {}
    lyr = model.model.layers[layer]

    def attn_hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["attn"] = (args, dict(kwargs))

    def mlp_hook(_m: torch.nn.Module, args: tuple) -> None:
        captured["mlp"] = (args, {})

    h1 = lyr.self_attn.register_forward_pre_hook(attn_hook, with_kwargs=True)
    h2 = lyr.mlp.register_forward_pre_hook(mlp_hook)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding on one row: a real attention mask goes through the kwargs
    mask[0, 0] = 1  # (a fully masked query row would give NaN rows in float64 eager attention)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    h1.remove()
    h2.remove()
    return captured


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index,return-value]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block", ["mlp", "self_attn"])
def test_linearized_block_is_first_order_taylor(arch: str, block: str) -> None:
    model = make_tiny_model(arch, seed=0).double()
    model.config._attn_implementation = "eager"
    args, kwargs = _block_inputs(model, 1)["attn" if block == "self_attn" else "mlp"]
    original = getattr(model.model.layers[1], block)
    with torch.no_grad():
        f0 = _first(original(*args, **kwargs)).clone()
    theta0 = {n: p.detach().clone() for n, p in original.named_parameters()}
    g = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) * p.abs().mean() for n, p in theta0.items()}

    lin = LinearizedModule(original)
    # theta = theta0: the linearised block is the original block.
    with torch.no_grad():
        out0 = lin(*args, **kwargs)
    assert isinstance(out0, tuple) == (block == "self_attn")
    torch.testing.assert_close(_first(out0), f0, rtol=0, atol=1e-12)

    # theta = theta0 + eps d: lin = f0 + eps * J d, exactly linear in eps ...
    def lin_at(eps: float) -> torch.Tensor:
        with torch.no_grad():
            for n, p in lin.theta().items():
                p.copy_(theta0[n] + eps * direction[n])
            return _first(lin(*args, **kwargs)).clone()

    def true_at(eps: float) -> torch.Tensor:
        with torch.no_grad():
            params = {n: theta0[n] + eps * direction[n] for n in theta0}
            return _first(torch.func.functional_call(lin.wrapped, params, args, kwargs)).clone()

    jd = (lin_at(1.0) - f0)  # J d
    for eps in (0.5, 0.1):
        # (eager attention runs its softmax in float32, hence the tolerance)
        torch.testing.assert_close(lin_at(eps) - f0, eps * jd, rtol=1e-5, atol=1e-6 * float(jd.abs().max()))
    # ... and agrees with finite differences of the true block to O(eps^2).
    errs = []
    for eps in (1e-2, 1e-3):
        fd = true_at(eps) - f0
        errs.append(float((fd - eps * jd).abs().max()))
        assert float((fd - eps * jd).abs().max()) < 10 * eps**2 * max(1.0, float(jd.abs().max()))
    assert errs[1] < errs[0] / 30  # error falls like eps^2 (factor 100 for eps / 10)
    # The true block is not linear: the test would catch a wrapper that merely evaluated f(theta).
    assert float((true_at(1.0) - f0 - jd).abs().max()) > 1e-6


def test_gradients_match_reverse_mode_reference() -> None:
    """Gradients through the jvp (w.r.t. theta and the block input) equal those of an independent
    reverse-mode construction of the same linearised function (double-vjp trick)."""
    model = make_tiny_model("llama", seed=0).double()
    args, _ = _block_inputs(model, 1)["mlp"]
    x = args[0].clone().requires_grad_(True)
    block = model.model.layers[1].mlp
    theta0 = {n: p.detach().clone() for n, p in block.named_parameters()}
    lin = LinearizedModule(block)
    with torch.no_grad():
        for p in lin.theta().values():
            p.add_(0.01 * torch.randn_like(p))
    w = torch.randn(x.shape, dtype=x.dtype)
    (lin(x) * w).sum().backward()
    g_theta = {n: p.grad.clone() for n, p in lin.theta().items()}
    g_x = x.grad.clone()

    # Reference: J d via the double-vjp trick, everything in reverse mode.
    x2 = args[0].clone().requires_grad_(True)
    theta = {n: lin.theta()[n].detach().clone().requires_grad_(True) for n in theta0}
    p0 = {n: t.clone().requires_grad_(True) for n, t in theta0.items()}
    f0 = torch.func.functional_call(block, p0, (x2,))
    u = torch.zeros_like(f0, requires_grad=True)
    vjp = torch.autograd.grad(f0, list(p0.values()), u, create_graph=True)
    d = [theta[n] - theta0[n] for n in theta0]
    jd = torch.autograd.grad(vjp, u, d, create_graph=True)[0]
    ((f0 + jd) * w).sum().backward()
    torch.testing.assert_close(g_x, x2.grad, rtol=1e-8, atol=1e-10)
    for n in theta0:
        torch.testing.assert_close(g_theta[n], theta[n].grad, rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("ignore:distillation variant 'attn' follows:FutureWarning")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_model_identity_and_trainable_tensors(arch: str, variant: str) -> None:
    model = make_tiny_model(arch, seed=0)  # default (sdpa) attention: the wrapper must cope
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    names_before = list(model.state_dict())
    plan = linearize_model(model, variant, skip_layers=1)
    attn_mode, mlp_mode = VARIANT_BLOCKS[variant]
    assert len(plan.linearized_blocks) == 2 * ((attn_mode == "linearized") + (mlp_mode == "linearized"))
    assert plan.layers == (1, 3)
    assert list(model.state_dict()) == names_before  # names unchanged, theta0 not persisted
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)

    want_attn, want_mlp = attn_mode is not None, mlp_mode is not None
    expected = {
        n
        for n, _ in model.named_parameters()
        if any(f"layers.{i}." in n for i in (1, 2))
        and ((want_attn and ".self_attn." in n) or (want_mlp and ".mlp." in n))
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected == set(plan.trainable)
    if arch == "qwen2" and want_attn:
        assert any(n.endswith("q_proj.bias") for n in trainable)  # 1-D tensors of the block train too
    # One frozen copy per trainable tensor, nothing more.
    assert theta0_nbytes(model) == sum(model.get_parameter(n).numel() * 4 for n in trainable)

    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert got_grad == expected
    assert all(b.grad is None for _, w in linearized_modules(model) for b in w.theta0().values())

    # A step changes exactly the trainable tensors; the delta is keyed by the plain names.
    with torch.no_grad():
        for n in trainable:
            p = model.get_parameter(n)
            p.sub_(1e-2 * p.grad)
    delta = delta_tensors(model, sign=-1.0)
    assert set(delta) == expected
    assert all(float(t.abs().max()) > 0 for t in delta.values())
    unlinearize_model(model)
    assert not list(linearized_modules(model))
    assert list(model.state_dict()) == names_before
    model.eval()
    with torch.no_grad():
        model(ids)  # plain model again (KV cache allowed)


def test_layer_range_and_errors() -> None:
    assert resolve_layer_range(24, skip_layers=4) == (4, 20)
    assert resolve_layer_range(24, layers=[2, 5]) == (2, 5)
    with pytest.raises(ConfigError, match="not both"):
        resolve_layer_range(24, layers=[2, 5], skip_layers=1)
    with pytest.raises(ConfigError, match="empty"):
        resolve_layer_range(4, skip_layers=2)
    model = make_tiny_model("llama", seed=0)
    with pytest.raises(ConfigError, match="did you mean 'ffn'"):
        linearize_model(model, "fnn")
    with pytest.raises(ConfigError, match="no MLP block"):
        linearize_model(model, "ffn", mlp_names=("feedforward",))
    plan = linearize_model(model, "attn_block", layers=[3, 4])
    assert plan.blocks == plan.linearized_blocks == ["model.layers.3.self_attn"]
    assert model.model.layers[3].self_attn.layer_idx == 3  # attributes fall through to the block
    with pytest.raises(ValueError, match="already linearised"):
        linearize_model(model, "ffn")


# --------------------------------------------------------------------------- reference variants
def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: model.get_parameter(n).grad.detach().clone() for n in names}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_reference_attn_variant_is_plain_finetuning_of_the_projections(arch: str) -> None:
    """`attn` (the reference's ntk='attn', its shipped choice) is exactly plain fine-tuning of the
    attention projections: same trainable tensors, bitwise the same loss and gradients as the
    unwrapped model with only q/k/v/o trainable, at theta0 and away from it, and the optimiser
    step gives the same weights."""
    plain = make_tiny_model(arch, seed=0)
    model = copy.deepcopy(plain)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(5))
    with pytest.warns(FutureWarning, match="follows the EnchTable reference"):
        plan = linearize_model(model, "attn")
    assert plan.linearized_blocks == [] and len(plan.blocks) == 4
    assert model.config.use_cache  # nothing linearised: the KV cache still works
    proj = [n for n, _ in plain.named_parameters() if any(f"self_attn.{p}_proj." in n for p in "qkvo")]
    assert set(plan.trainable) == set(proj)  # q/k/v/o weights (+ Qwen2's q/k/v biases), nothing else
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in proj)
    for n, p in plain.named_parameters():
        p.requires_grad_(n in proj)
    opt_a = torch.optim.AdamW([plain.get_parameter(n) for n in proj], lr=1e-2)
    opt_b = torch.optim.AdamW([model.get_parameter(n) for n in proj], lr=1e-2)
    for _ in range(3):  # step 0 at theta0, then away from it
        la, ga = _loss_and_grads(plain, ids, proj)
        lb, gb = _loss_and_grads(model, ids, proj)
        assert torch.equal(la, lb)
        for n in proj:
            assert torch.equal(ga[n], gb[n]), n
        opt_a.step()
        opt_b.step()
    for n in proj:
        assert torch.equal(plain.get_parameter(n), model.get_parameter(n)), n
    # ... and the delta is what plain fine-tuning moved.
    delta = delta_tensors(model, sign=-1.0)
    assert set(delta) == set(proj) and all(float(t.abs().max()) > 0 for t in delta.values())


def test_linearising_a_single_linear_is_the_linear_itself() -> None:
    """Why the reference's `attn` mode is plain fine-tuning: its per-`nn.Linear` first-order
    expansion W0 x + b0 + (W - W0) x + (b - b0) equals W x + b (up to float rounding), with the
    same gradients, however far theta is from theta0."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).double()
    ref = copy.deepcopy(lin)
    wrapped = LinearizedModule(lin)  # linearize=True: a real jvp, as the reference's LinearizedModel
    with torch.no_grad():
        for p, q in zip(wrapped.theta().values(), ref.parameters()):
            step = torch.randn_like(p)  # far from theta0: a non-linear block would differ a lot
            p.add_(step)
            q.add_(step)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, out_ref = wrapped(x), ref(x2)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out.pow(2).sum().backward()
    out_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    for p, q in zip(wrapped.theta().values(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["ffn", "attn_ffn", "attn_block"])
def test_linearised_variants_differ_from_plain_finetuning(variant: str) -> None:
    """`ffn` (and the MLP of `attn_ffn`, and `attn_block`) really linearise: away from theta0 the
    loss differs from the plain model's with the same weights, while at theta0 it is the same."""
    plain = make_tiny_model("llama", seed=0)
    model = copy.deepcopy(plain)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        plan = linearize_model(model, variant)
    assert plan.linearized_blocks
    with torch.no_grad():
        l0 = model(input_ids=ids, labels=ids, use_cache=False).loss
        torch.testing.assert_close(l0, plain(input_ids=ids, labels=ids, use_cache=False).loss, rtol=1e-5, atol=1e-6)
        g = torch.Generator().manual_seed(2)
        for n in plan.trainable:
            step = torch.randn(model.get_parameter(n).shape, generator=g) * 0.5 * model.get_parameter(n).abs().mean()
            model.get_parameter(n).add_(step)
            plain.get_parameter(n).add_(step)
        l_lin = model(input_ids=ids, labels=ids, use_cache=False).loss
        l_plain = plain(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(float(l_lin) - float(l_plain)) > 1e-4


def test_variant_names_and_deprecations() -> None:
    from hf_safety_merge.distill.variants import resolve_variant

    assert resolve_variant("ffn") == "ffn"
    with pytest.warns(FutureWarning, match="now called 'attn_block_ffn'"):
        assert resolve_variant("hybrid") == "attn_block_ffn"
    with pytest.warns(FutureWarning, match="now variant 'attn_block'"):
        assert resolve_variant("attn") == "attn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_variant("attn", warn_attn=False) == "attn"
        assert resolve_variant("attn_block") == "attn_block"
    with pytest.raises(ConfigError, match="did you mean 'attn_ffn'"):
        resolve_variant("attn_fnn")
    model = make_tiny_model("llama", seed=0)
    with pytest.warns(FutureWarning):
        plan = linearize_model(model, "hybrid", layers=[0, 1])
    assert plan.variant == "attn_block_ffn" and len(plan.linearized_blocks) == 2
