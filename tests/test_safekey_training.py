"""SafeKeyTrainer on a tiny random Llama with a trained byte-level BPE tokenizer, offline.

- both weights 0: SafeKeyTrainer equals SFTTrainer step for step (same losses, bit-identical weights);
- the query-masked pass cannot see the query (other query tokens, same QMM logits on K), with
  `sdpa` and `eager` attention, no NaN anywhere (padding rows, query rows);
- training with the auxiliary losses: metrics logged and finite, heads trained, heads absent from the
  saved model, saved beside it on request and in checkpoints (and loaded back on resume);
- the last-k-epochs schedule, with epochs and with max_steps; gradient accumulation;
- raw (prompt, response, label) records are prepared by the trainer; eval metrics; config errors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_safety_merge.errors import ConfigError

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
HARMFUL = ["pick a lock to enter my neighbour's house", "make a fake ID", "write a phishing email", "poison a pet"]
BENIGN = ["bake bread at home", "learn to swim", "plant tomatoes", "fix a bike tyre"]


def records(n: int = 16) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        harmful = i % 2 == 0
        topic = (HARMFUL if harmful else BENIGN)[(i // 2) % 4]
        key = "This request could hurt someone, so I must refuse." if harmful else "This is a safe request, so I can help."
        answer = "I can't help with that." if harmful else f"Sure, here is how to {topic}."
        out.append({
            "prompt": f"How do I {topic}? (case {i})",
            "response": f"<think>The user asks how to {topic}. They want clear steps. {key} Let me answer.</think>{answer}",
            "label": int(harmful),
        })
    return out


@pytest.fixture(scope="module")
def tok() -> Any:
    from hf_safety_merge.testing.distill import tiny_tokenizer

    return tiny_tokenizer([r["prompt"] + " " + r["response"] for r in records()], vocab_size=600)


@pytest.fixture(scope="module")
def dataset(tok: Any) -> Any:
    from hf_safety_merge.training.safekey import prepare_safekey_dataset

    return prepare_safekey_dataset(records(), tok, max_length=96)


def tiny_model(tok: Any, attn: str = "sdpa") -> Any:
    from hf_safety_merge.testing.models import make_tiny_model

    model = make_tiny_model("llama", 0, vocab_size=len(tok), **TINY)
    model.config._attn_implementation = attn
    model.train()
    return model


def train_args(cls: type, out: Path, **overrides: Any) -> Any:
    kw: dict[str, Any] = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], bf16=False, use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, max_length=96,
    )
    kw.update(overrides)
    return cls(**kw)


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _logged(trainer: Any, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_weights_zero_equals_sft_trainer(tok: Any, dataset: Any, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    sft_model = tiny_model(tok)
    sft = SFTTrainer(model=sft_model, args=train_args(SFTConfig, tmp_path / "sft"), train_dataset=dataset, processing_class=tok)
    sft.train()
    sk_model = tiny_model(tok)
    args = train_args(SafeKeyConfig, tmp_path / "sk", safekey_head_weight=0.0, safekey_qmm_weight=0.0, safekey_last_k_epochs=None)
    sk = SafeKeyTrainer(model=sk_model, args=args, train_dataset=dataset, processing_class=tok)
    sk.train()
    assert len(_losses(sft)) == 4
    assert _losses(sk) == _losses(sft)  # bit-identical, step for step
    s1, s2 = sft_model.state_dict(), sk_model.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert not _logged(sk, "safekey/head_loss") and not _logged(sk, "safekey/qmm_loss")
    assert _logged(sk, "safekey/sft_loss") == pytest.approx(_losses(sft), rel=1e-6)


def _batch(trainer: Any, dataset: Any, idx: list[int]) -> dict[str, Any]:
    return trainer.data_collator([dataset[i] for i in idx])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qmm_cannot_see_query_and_no_nan(tok: Any, dataset: Any, tmp_path: Path, attn: str) -> None:
    """The masked pass is the reference's (2-D mask, 0 on the query): blind to the query, finite
    everywhere, equal to the reference's call, and equal to the compact pass."""
    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    model = tiny_model(tok, attn)
    trainer = SafeKeyTrainer(model=model, args=train_args(SafeKeyConfig, tmp_path, safekey_qmm_mode="masked"), train_dataset=dataset, processing_class=tok)
    model.eval()
    lengths = [len(x) for x in dataset["input_ids"]]
    short, long_ = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert min(lengths) < max(lengths)  # a padded row in the batch
    rows = [dataset[long_], dataset[short]]
    batch = trainer.data_collator(rows)
    q = batch["safekey_query_len"]
    # the same rows with other query tokens (same query lengths), collated afresh
    g = torch.Generator().manual_seed(1)
    changed = []
    for row in rows:
        n = row["safekey_query_len"]
        changed.append({**row, "input_ids": torch.randint(0, len(tok), (n,), generator=g).tolist() + row["input_ids"][n:]})
    other = trainer.data_collator(changed)
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    assert torch.equal(other["input_ids"][:, q.max():], batch["input_ids"][:, q.max():])
    mask = batch["qmm_attention_mask"]
    n = mask.shape[-1]
    assert mask.shape == (2, n) and mask.dtype == torch.long  # the reference's 2-D form
    for r in range(2):  # 0 on every query token, the padding mask elsewhere
        assert not mask[r, : q[r]].any()
        assert torch.equal(mask[r, q[r] :], batch["attention_mask"][r, q[r] : n])
    with torch.no_grad():
        a = trainer.qmm_forward(model, batch, logits=True).logits
        b_ = trainer.qmm_forward(model, other, logits=True).logits
        plain_a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain_b = model(input_ids=other["input_ids"], attention_mask=batch["attention_mask"]).logits
        fused_a = trainer.qmm_forward(model, batch)
        fused_b = trainer.qmm_forward(model, other)
    assert torch.isfinite(a).all() and torch.isfinite(b_).all()  # query rows, response rows and padding rows
    k_end = [int(batch["safekey_k_mask"][r].nonzero().max()) + 1 for r in range(2)]
    assert a.shape[1] == max(k_end)  # the pass stops at the batch's last K token (later tokens cannot matter)
    for r in range(2):
        k = batch["safekey_k_mask"][r].nonzero().flatten()
        pred = k - 1  # logits at t predict token t + 1
        torch.testing.assert_close(a[r, pred], b_[r, pred], atol=1e-5, rtol=0)
        # every position after the query is blind to it, not only K
        torch.testing.assert_close(a[r, q[r] :], b_[r, q[r] :], atol=1e-5, rtol=0)
        # ... while the ordinary forward does see the query
        assert (plain_a[r, pred] - plain_b[r, pred]).abs().max() > 1e-3
    assert fused_a.token_logprobs.numel() == int(batch["safekey_k_mask"].sum())  # K tokens only
    assert torch.equal(fused_a.rows, batch["safekey_k_mask"].nonzero()[:, 0])
    torch.testing.assert_close(fused_a.token_logprobs, fused_b.token_logprobs, atol=1e-5, rtol=0)
    assert torch.isfinite(fused_a.token_logprobs).all() and (fused_a.token_logprobs < 0).all()
    # the same numbers as the full logits of the masked pass
    lp = a.float().log_softmax(-1)
    for r in range(2):
        k = batch["safekey_k_mask"][r].nonzero().flatten()
        ref = lp[r, k - 1].gather(-1, batch["input_ids"][r, k][:, None])[:, 0]
        torch.testing.assert_close(fused_a.token_logprobs[fused_a.rows == r], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_a.loss, -fused_a.token_logprobs.mean())
    # the positions are the unchanged 0..T-1
    assert torch.equal(batch["qmm_position_ids"][1], torch.arange(mask.shape[-1]))
    # the reference's call (SafeKey train/sft.py): the same tokens and 2-D mask, no position ids
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"][:, :n], attention_mask=mask).logits
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)
    # compact mode: only the tokens after the query, at their positions: the same K log-probs
    with torch.no_grad():
        compact = trainer.qmm_forward(model, batch, mode="compact")
    assert torch.equal(compact.rows, fused_a.rows)
    torch.testing.assert_close(compact.token_logprobs, fused_a.token_logprobs, atol=1e-5, rtol=1e-5)
    # without the collator's mask the trainer builds the same one
    with torch.no_grad():
        rebuilt = trainer.qmm_forward(model, {k: v for k, v in batch.items() if not k.startswith("qmm_")})
    torch.testing.assert_close(rebuilt.token_logprobs, fused_a.token_logprobs, atol=0, rtol=0)


def test_training_with_aux_losses_and_heads(tok: Any, dataset: Any, tmp_path: Path) -> None:
    from safetensors import safe_open

    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer
    from hf_safety_merge.training.safekey import HEADS_FILE, DualPathSafetyHead

    model = tiny_model(tok, "eager")
    args = train_args(SafeKeyConfig, tmp_path / "out", safekey_last_k_epochs=None, max_steps=6, safekey_head_weight=1.0,
                      save_strategy="steps", save_steps=6, eval_strategy="no")
    trainer = SafeKeyTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(8)), processing_class=tok)
    assert not any("head" in n and "lm_head" not in n for n, _ in model.named_parameters())  # heads are not submodules
    init = {k: v.clone() for k, v in trainer.safekey_heads.state_dict().items()}
    trainer.train()
    for key in ("safekey/head_loss", "safekey/qmm_loss", "safekey/head_accuracy", "safekey/sft_loss", "loss", "grad_norm"):
        vals = _logged(trainer, key)
        assert len(vals) == 6 and all(math.isfinite(v) for v in vals), key
    assert all(0.0 <= v <= 1.0 for v in _logged(trainer, "safekey/head_accuracy"))
    # the total loss is L_SFT + 0.2 L_QMM + 1.0 L_head
    h = trainer.state.log_history[0]
    assert h["loss"] == pytest.approx(h["safekey/sft_loss"] + 0.2 * h["safekey/qmm_loss"] + 1.0 * h["safekey/head_loss"], rel=1e-4)
    assert _logged(trainer, "safekey/qmm_loss")[-1] < _logged(trainer, "safekey/qmm_loss")[0]
    assert _logged(trainer, "safekey/head_loss")[-1] < _logged(trainer, "safekey/head_loss")[0]
    after = trainer.safekey_heads.state_dict()
    assert all(not torch.equal(init[k], after[k]) for k in init)  # the heads were trained
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # eval: the auxiliary metrics are logged with the eval_ prefix
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_safekey/head_loss"]) and math.isfinite(metrics["eval_safekey/qmm_loss"])
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_safekey/sft_loss"], rel=1e-5)

    # the saved model holds exactly the model's tensors, no head
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict()) and not (out / HEADS_FILE).exists()
    assert not any(k.startswith(("u_head", "xu_head", "safekey")) for k in keys)
    # ... beside it when asked
    p = trainer.save_safekey_heads(out)
    loaded = DualPathSafetyHead.load(p)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, after[k].cpu())
    trainer.args.safekey_save_heads = True
    trainer.save_model(str(tmp_path / "saved2"))
    assert (tmp_path / "saved2" / HEADS_FILE).is_file()
    # checkpoints hold them, and resuming loads them back
    ckpt = tmp_path / "out" / "checkpoint-6"
    assert (ckpt / HEADS_FILE).is_file()
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == keys
    fresh = SafeKeyTrainer(model=tiny_model(tok, "eager"), args=train_args(SafeKeyConfig, tmp_path / "r"), train_dataset=dataset,
                           processing_class=tok)
    fresh._load_from_checkpoint(str(ckpt))
    for k, v in fresh.safekey_heads.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_last_k_epochs_schedule(tok: Any, dataset: Any, tmp_path: Path) -> None:
    """8 rows, batch 4: 2 optimiser steps per epoch. 3 epochs, k = 2: off for epoch 1, on for epochs 2-3.
    max_steps = 5, k = 1: the last 2 steps."""
    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    data = dataset.select(range(8))
    args = train_args(SafeKeyConfig, tmp_path / "e", max_steps=-1, num_train_epochs=3, safekey_last_k_epochs=2)
    tr = SafeKeyTrainer(model=tiny_model(tok), args=args, train_dataset=data, processing_class=tok)
    tr.train()
    assert _logged(tr, "safekey/aux_active") == [0, 0, 1, 1, 1, 1]
    assert [h["step"] for h in tr.state.log_history if "safekey/qmm_loss" in h] == [3, 4, 5, 6]
    assert [h["step"] for h in tr.state.log_history if "safekey/head_loss" in h] == [3, 4, 5, 6]

    args = train_args(SafeKeyConfig, tmp_path / "s", max_steps=5, safekey_last_k_epochs=1, safekey_head_weight=0.0)
    tr = SafeKeyTrainer(model=tiny_model(tok), args=args, train_dataset=data, processing_class=tok)
    tr.train()
    assert _logged(tr, "safekey/aux_active") == [0, 0, 0, 1, 1]
    assert not _logged(tr, "safekey/head_loss")  # weight 0: the heads are off


def test_gradient_accumulation_keeps_weights_per_step(tok: Any, dataset: Any, tmp_path: Path) -> None:
    """batch 4 == batch 2 x 2 accumulation steps (head loss only: a per-example mean, so exact)."""
    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    def run(bs: int, ga: int, out: str) -> Any:
        args = train_args(SafeKeyConfig, tmp_path / out, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                          max_steps=3, safekey_last_k_epochs=None, safekey_qmm_weight=0.0, safekey_head_weight=5.0)
        tr = SafeKeyTrainer(model=tiny_model(tok), args=args, train_dataset=dataset, processing_class=tok)
        tr.train()
        return tr

    a, b = run(4, 1, "a"), run(2, 2, "b")
    for x, y in zip(_losses(a), _losses(b), strict=True):
        assert y == pytest.approx(x, rel=1e-4)
    for k, v in a.safekey_heads.state_dict().items():
        torch.testing.assert_close(b.safekey_heads.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_compact_qmm_trains_like_masked(tok: Any, dataset: Any, tmp_path: Path) -> None:
    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    runs = {}
    for mode in ("masked", "compact"):
        args = train_args(SafeKeyConfig, tmp_path / mode, max_steps=3, safekey_last_k_epochs=None, safekey_qmm_mode=mode,
                          safekey_qmm_weight=1.0)
        runs[mode] = SafeKeyTrainer(model=tiny_model(tok), args=args, train_dataset=dataset, processing_class=tok)
        runs[mode].train()
    assert runs["compact"].data_collator([dataset[0]])["qmm_attention_mask"].dim() == 2  # no T x T mask to build
    for key in ("loss", "safekey/qmm_loss"):
        m, c = _logged(runs["masked"], key), _logged(runs["compact"], key)
        assert len(m) == 3 and c == pytest.approx(m, rel=1e-4), key


def test_raw_records_and_detach(tok: Any, tmp_path: Path) -> None:
    """Raw (prompt, response, label) records are prepared by the trainer; detached head inputs leave
    the model's gradient from the head loss at zero."""
    from datasets import Dataset

    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    raw = Dataset.from_list(records(8))
    args = train_args(SafeKeyConfig, tmp_path, max_steps=1, safekey_last_k_epochs=None, safekey_qmm_weight=0.0,
                      safekey_detach_head_inputs=True)
    tr = SafeKeyTrainer(model=tiny_model(tok), args=args, train_dataset=raw, processing_class=tok)
    assert "safekey_k_end" in tr.train_dataset.column_names
    batch = tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(4)]))
    tr.model.train()
    tr.compute_loss(tr.model, dict(batch)).backward()
    g_detached = [p.grad.clone() for p in tr.model.parameters()]
    assert all(p.grad is not None for p in tr.safekey_heads.parameters())
    tr.model.zero_grad()
    tr.args.safekey_head_weight = 0.0
    tr.compute_loss(tr.model, dict(batch)).backward()
    g_none = [p.grad.clone() for p in tr.model.parameters()]
    for g1, g0 in zip(g_detached, g_none, strict=True):
        torch.testing.assert_close(g1, g0)
    # without detaching, the head loss does reach the model
    tr.model.zero_grad()
    tr.args.safekey_head_weight, tr.args.safekey_detach_head_inputs = 0.2, False
    tr.compute_loss(tr.model, dict(batch)).backward()
    assert max((p.grad - g0).abs().max().item() for p, g0 in zip(tr.model.parameters(), g_none, strict=True)) > 1e-6


def test_config_and_trainer_errors(tok: Any, dataset: Any, tmp_path: Path) -> None:
    from trl import SFTConfig

    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    with pytest.raises(ConfigError, match="safekey_head_weight must be a finite number >= 0"):
        train_args(SafeKeyConfig, tmp_path, safekey_head_weight=-1.0)
    with pytest.raises(ConfigError, match="safekey_head_theta"):
        train_args(SafeKeyConfig, tmp_path, safekey_head_theta=1.5)
    with pytest.raises(ConfigError, match="safekey_last_k_epochs"):
        train_args(SafeKeyConfig, tmp_path, safekey_last_k_epochs=0)
    with pytest.raises(ConfigError, match=r"safekey_qmm_mode 'compac' .*did you mean 'compact'"):
        train_args(SafeKeyConfig, tmp_path, safekey_qmm_mode="compac")
    with pytest.raises(ConfigError, match="packing"):
        train_args(SafeKeyConfig, tmp_path, packing=True)
    with pytest.raises(ConfigError, match="needs a SafeKeyConfig"):
        SafeKeyTrainer(model=tiny_model(tok), args=train_args(SFTConfig, tmp_path), train_dataset=dataset, processing_class=tok)
    # a data set without the SafeKey columns
    plain = dataset.remove_columns(["safekey_k_start", "safekey_k_end"])
    with pytest.raises(ConfigError, match=r"lacks \['safekey_k_start', 'safekey_k_end'\]"):
        SafeKeyTrainer(model=tiny_model(tok), args=train_args(SafeKeyConfig, tmp_path), train_dataset=plain, processing_class=tok)
    # rows longer than max_length
    with pytest.raises(ConfigError, match="more than max_length=8"):
        SafeKeyTrainer(model=tiny_model(tok), args=train_args(SafeKeyConfig, tmp_path, max_length=8), train_dataset=dataset,
                       processing_class=tok)
    # raw records with a bad label
    from datasets import Dataset

    bad = Dataset.from_list([{**r, "label": "perhaps"} for r in records(2)])
    with pytest.raises(ConfigError, match="record 0: cannot read label 'perhaps'"):
        SafeKeyTrainer(model=tiny_model(tok), args=train_args(SafeKeyConfig, tmp_path), train_dataset=bad, processing_class=tok)
    # inconsistent spans in a hand-made row
    tr = SafeKeyTrainer(model=tiny_model(tok), args=train_args(SafeKeyConfig, tmp_path), train_dataset=dataset, processing_class=tok)
    row = {**dataset[0], "safekey_k_end": 10_000}
    with pytest.raises(ConfigError, match="batch example 0: SafeKey spans"):
        tr.data_collator([row])


def test_lora_bf16_gradient_checkpointing(tok: Any, dataset: Any, tmp_path: Path) -> None:
    """PEFT LoRA, bf16 autocast, gradient checkpointing: the heads see the final hidden states through
    the PEFT wrapper, stay float32, train, and never enter the adapter."""
    from peft import LoraConfig
    from safetensors import safe_open

    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    args = train_args(SafeKeyConfig, tmp_path / "lora", safekey_last_k_epochs=None, bf16=True, gradient_checkpointing=True,
                      max_steps=3, safekey_qmm_mode="compact")
    peft_cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tr = SafeKeyTrainer(model=tiny_model(tok), args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_cfg)
    init = {k: v.clone() for k, v in tr.safekey_heads.state_dict().items()}
    tr.train()
    for key in ("safekey/head_loss", "safekey/qmm_loss", "loss"):
        vals = _logged(tr, key)
        assert len(vals) == 3 and all(math.isfinite(v) for v in vals), key
    assert all(p.dtype == torch.float32 for p in tr.safekey_heads.parameters())
    assert any(not torch.equal(init[k], v) for k, v in tr.safekey_heads.state_dict().items())
    tr.save_model(str(tmp_path / "adapter"))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
