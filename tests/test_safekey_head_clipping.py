"""How `max_grad_norm` reaches the dual-path heads' gradients, and that they are zeroed each step.

- `safekey_clip_heads_with_model=True`: one global norm over the model's and the heads' gradients
  and one scale factor for all of them (the reference's heads are a submodule of its DeepSpeed
  model, which clips everything together); the logged `grad_norm` is that joint norm;
- the default clips the model and the heads separately, each to `max_grad_norm` (a control: the
  two rules give different head gradients on the same step);
- the heads' gradients are those of the current optimiser step only (they sit outside the model,
  whose gradients `Trainer` zeroes): with the weights frozen (lr 0) and the same batch every step,
  every step sees the same head gradient.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_safekey_training import records, tiny_model, train_args
from transformers import TrainerCallback

from hf_safety_merge.errors import ConfigError

MAX_NORM = 1e-3  # far below both the model's and the heads' gradient norms: clipping is active


@pytest.fixture(scope="module")
def tok() -> Any:
    from hf_safety_merge.testing.distill import tiny_tokenizer

    return tiny_tokenizer([r["prompt"] + " " + r["response"] for r in records()], vocab_size=600)


class _Spy(TrainerCallback):
    """Gradients before the clip (wrapping `_clip_grad_norm`) and after it, once the optimiser's
    pre-step hook has run too (`on_optimizer_step`: the step does not touch `.grad`)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.pre: list[dict[str, torch.Tensor]] = []
        self.post: list[dict[str, torch.Tensor]] = []
        self.norms: list[float] = []
        inner = trainer._clip_grad_norm

        def spy(model: Any) -> Any:
            self.pre.append(self._grads(model))
            norm = inner(model)
            self.norms.append(float(norm))
            return norm

        trainer._clip_grad_norm = spy

    def _grads(self, model: Any) -> dict[str, torch.Tensor]:
        out = {f"model.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        out.update({f"heads.{n}": p.grad.detach().clone() for n, p in self.trainer.safekey_heads.named_parameters() if p.grad is not None})
        return out

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.post.append(self._grads(kwargs["model"]))


def _train(tok: Any, tmp: Path, n_records: int = 16, **overrides: Any) -> _Spy:
    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer
    from hf_safety_merge.training.safekey import prepare_safekey_dataset

    dataset = prepare_safekey_dataset(records(n_records), tok, max_length=96)
    kw: dict[str, Any] = dict(max_steps=2, max_grad_norm=MAX_NORM, safekey_last_k_epochs=None, safekey_qmm_weight=0.2)
    kw.update(overrides)
    trainer = SafeKeyTrainer(model=tiny_model(tok), args=train_args(SafeKeyConfig, tmp, **kw), train_dataset=dataset, processing_class=tok)
    spy = _Spy(trainer)
    trainer.add_callback(spy)
    trainer.train()
    spy.log = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]  # type: ignore[attr-defined]
    return spy


def _norm(grads: dict[str, torch.Tensor], prefix: str = "") -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for n, g in grads.items() if n.startswith(prefix)))


def test_joint_clip_is_one_global_norm_over_model_and_heads(tok: Any, tmp_path: Path) -> None:
    spy = _train(tok, tmp_path, safekey_clip_heads_with_model=True)
    assert len(spy.pre) == len(spy.post) == 2
    for step, (pre, post, norm) in enumerate(zip(spy.pre, spy.post, spy.norms, strict=True)):
        model_norm, heads_norm, total = _norm(pre, "model."), _norm(pre, "heads."), _norm(pre)
        assert model_norm > 10 * MAX_NORM and heads_norm > 10 * MAX_NORM, (model_norm, heads_norm)
        assert any(n.startswith("heads.") for n in pre) and set(post) == set(pre)
        assert norm == pytest.approx(total, rel=1e-5)  # the returned (and logged) norm includes the heads
        scale = MAX_NORM / (total + 1e-6)  # torch's clip_grad_norm_ coefficient
        for n, g in pre.items():
            torch.testing.assert_close(post[n], g * scale, rtol=1e-5, atol=1e-12, msg=f"step {step}: {n}")
        assert _norm(post) == pytest.approx(MAX_NORM, rel=1e-3)
    assert spy.log == pytest.approx(spy.norms, rel=1e-5)  # type: ignore[attr-defined]


def test_default_clips_heads_separately(tok: Any, tmp_path: Path) -> None:
    spy = _train(tok, tmp_path)
    for pre, post, norm in zip(spy.pre, spy.post, spy.norms, strict=True):
        model_norm, heads_norm, total = _norm(pre, "model."), _norm(pre, "heads."), _norm(pre)
        assert norm == pytest.approx(model_norm, rel=1e-5)  # Trainer's norm: the model's only
        for prefix, own in (("model.", model_norm), ("heads.", heads_norm)):
            for n, g in pre.items():
                if n.startswith(prefix):
                    torch.testing.assert_close(post[n], g * (MAX_NORM / (own + 1e-6)), rtol=1e-5, atol=1e-12)
        # not the joint rule: the heads end with their own norm MAX_NORM, not their share of it
        assert _norm(post, "heads.") == pytest.approx(MAX_NORM, rel=1e-3)
        assert abs(_norm(post, "heads.") - heads_norm * MAX_NORM / total) > 0.05 * MAX_NORM


@pytest.mark.parametrize("joint", [False, True])
def test_head_gradients_are_those_of_the_current_step(tok: Any, tmp_path: Path, joint: bool) -> None:
    # 4 records, batch 4: every step is the same batch; lr 0 keeps the weights, so every step's
    # gradients are the same, and so must the heads' be (they used to add up over steps).
    spy = _train(tok, tmp_path, n_records=4, max_steps=3, learning_rate=0.0, max_grad_norm=0.0, safekey_clip_heads_with_model=joint)
    assert len(spy.post) == 3 and not spy.pre  # max_grad_norm 0: no clip at all
    first = {n: g for n, g in spy.post[0].items() if n.startswith("heads.")}
    assert len(first) == 4 and _norm(first) > 0
    for later in spy.post[1:]:  # the same up to the order of the rows in the batch (not twice, three times as big)
        for n, g in first.items():
            torch.testing.assert_close(later[n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_flag_is_a_boolean(tmp_path: Path) -> None:
    from hf_safety_merge.training import SafeKeyConfig

    with pytest.raises(ConfigError, match=r"^safekey_clip_heads_with_model must be true or false, got 'yes'$"):
        train_args(SafeKeyConfig, tmp_path, safekey_clip_heads_with_model="yes")
    assert train_args(SafeKeyConfig, tmp_path).safekey_clip_heads_with_model is False
