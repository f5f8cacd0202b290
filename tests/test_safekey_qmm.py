"""SafeKey's query-masked pass across architectures, and the head loss weight, offline on tiny random models.

- "masked" is the reference's form (SafeKey `train/sft.py`: a 2-D attention mask that is 0 on every
  query token, no position ids): equal to that call, blind to the query, finite;
- "compact" equals "masked" (K log-probs to 1e-5) on every model type in `COMPACT_EXACT_MODEL_TYPES`:
  full attention (Llama, Qwen2, Qwen3, Phi-3, OLMo-2, SmolLM3, Granite), sliding windows of 8 (Mistral,
  Qwen2 with `use_sliding_window`, Gemma-2, Gemma-3), a conv layer (LFM2) and a linear-attention layer
  (Qwen3-Next); a custom 4-D mask (the earlier form) is shown to differ there, so the check has teeth;
- `safekey_qmm_mode="auto"` picks compact only for those types; "compact" elsewhere is refused;
- `safekey_head_theta` is the reference's weight between the two BCE terms, and the heads read the
  reference's hidden states (`output.hidden_states[-1]` of the SFT pass).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hf_safety_merge.errors import ConfigError

V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
# (model_type, extra config, attention implementation, is the 4-D mask form wrong here?)
ARCHS: dict[str, tuple[str, dict[str, Any], str, bool]] = {
    "llama": ("llama", {}, "sdpa", False),
    "qwen2": ("qwen2", {}, "sdpa", False),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "sdpa", True),
    "qwen3": ("qwen3", dict(head_dim=8), "sdpa", False),
    "mistral-sliding": ("mistral", dict(sliding_window=8), "sdpa", True),
    "gemma2-sliding": ("gemma2", dict(head_dim=8, sliding_window=8), "eager", True),
    "gemma3-sliding": ("gemma3_text", dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
                       "sdpa", True),
    "phi3": ("phi3", {}, "sdpa", False),
    "olmo2": ("olmo2", {}, "sdpa", False),
    "smollm3": ("smollm3", {}, "sdpa", False),
    "granite": ("granite", {}, "sdpa", False),
    "lfm2-conv": ("lfm2", dict(layer_types=["conv", "full_attention"]), "sdpa", True),
    "qwen3_next-linear": ("qwen3_next", dict(
        head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16), "sdpa", True),
}


def _model(model_type: str, extra: dict[str, Any], attn: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**BASE, **extra})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, different query lengths, the second right-padded inside the span of the QMM pass."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (2, 40), generator=g)
    attn = torch.ones(2, 40, dtype=torch.long)
    attn[1, 28:] = 0
    q = torch.tensor([12, 9])
    k = torch.zeros(2, 40, dtype=torch.bool)
    k[0, 24:30] = True  # K ends 18 tokens after the query: more than the window of 8
    k[1, 20:26] = True
    return {"input_ids": ids, "attention_mask": attn, "query_len": q, "k_mask": k}


def _k_logprobs(model: Any, b: dict[str, torch.Tensor], mode: str, form: str = "library") -> torch.Tensor:
    from hf_safety_merge.training.safekey import build_qmm_inputs

    x = build_qmm_inputs(b["input_ids"], b["attention_mask"], b["query_len"], b["k_mask"], mode, 0)
    n = x["qmm_input_ids"].shape[1]
    if form == "library":
        kw = dict(attention_mask=x["qmm_attention_mask"], position_ids=x["qmm_position_ids"])
    elif form == "reference":  # train/sft.py: attn_mask = 1 everywhere (padding too), 0 on the query; no position ids
        ref = torch.ones(2, n, dtype=torch.long)
        for r in range(2):
            ref[r, : b["query_len"][r]] = 0
        kw = dict(attention_mask=ref)
    else:  # "4d": the earlier custom mask, causal and blind to the query, passed through as is
        pos = torch.arange(n)
        q = b["query_len"].view(2, 1, 1)
        m = (pos[None, :, None] >= pos[None, None, :]) & ~((pos[None, :, None] >= q) & (pos[None, None, :] < q))
        m = m | torch.eye(n, dtype=torch.bool)[None]
        if model.config._attn_implementation == "eager":
            m = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
        kw = dict(attention_mask=m[:, None], position_ids=x["qmm_position_ids"])
    with torch.no_grad():
        logits = model(input_ids=x["qmm_input_ids"], use_cache=False, **kw).logits.float()
    assert torch.isfinite(logits).all()
    lp = logits[:, x["qmm_logit_positions"]].log_softmax(-1)
    t = x["qmm_targets"]
    return lp.gather(-1, t.clamp(min=0)[..., None])[..., 0][t != -100]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_compact_equals_masked_equals_reference(arch: str) -> None:
    model_type, extra, attn, four_d_wrong = ARCHS[arch]
    model = _model(model_type, extra, attn)
    assert model.config.model_type == model_type
    b = _batch()
    masked = _k_logprobs(model, b, "masked")
    assert masked.numel() == int(b["k_mask"].sum())
    torch.testing.assert_close(masked, _k_logprobs(model, b, "masked", "reference"), atol=1e-5, rtol=0)
    torch.testing.assert_close(_k_logprobs(model, b, "compact"), masked, atol=1e-5, rtol=0)
    # blind to the query: other query tokens, the same K log-probs
    other = {**b, "input_ids": b["input_ids"].clone()}
    other["input_ids"][:, :9] = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(5))
    other["input_ids"][0, 9:12] = torch.tensor([5, 6, 7])
    torch.testing.assert_close(_k_logprobs(model, other, "masked"), masked, atol=1e-5, rtol=0)
    if four_d_wrong:  # the 4-D form skips the sliding window / lets conv and linear attention read the query
        assert (_k_logprobs(model, b, "masked", "4d") - masked).abs().max() > 1e-2


def test_every_compact_model_type_is_tested() -> None:
    from hf_safety_merge.training.safekey import COMPACT_EXACT_MODEL_TYPES

    assert {t for t, *_ in ARCHS.values()} == set(COMPACT_EXACT_MODEL_TYPES)


def test_mode_resolution_and_refusal(tmp_path: Any) -> None:
    from hf_safety_merge.training.safekey import resolve_qmm_mode

    assert resolve_qmm_mode("auto", "llama") == "compact"
    assert resolve_qmm_mode("auto", "llama4_text") == "masked"
    assert resolve_qmm_mode("masked", "llama") == "masked"
    assert resolve_qmm_mode("compact", "qwen3_next") == "compact"
    with pytest.raises(ConfigError, match=r"safekey_qmm_mode='compact' .* model type 'llama4_text'; use safekey_qmm_mode='masked'") as e:
        resolve_qmm_mode("compact", "llama4_text")
    assert "\n" not in str(e.value)


def _trainer(tmp_path: Any, model: Any, tok: Any, ds: Any, **kw: Any) -> Any:
    from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

    args = SafeKeyConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                         save_strategy="no", max_length=256, disable_tqdm=True, bf16=False, **kw)
    return SafeKeyTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


@pytest.fixture(scope="module")
def tok_ds() -> tuple[Any, Any]:
    from hf_safety_merge.testing.distill import tiny_tokenizer
    from hf_safety_merge.training.safekey import prepare_safekey_dataset

    recs = [{"prompt": f"How do I {t}?", "response": f"<think>The user asks how to {t}. {k} Fine.</think>Ok.", "label": y}
            for t, k, y in [("bake bread", "This is harmless.", 0), ("poison a pet", "This is harmful.", 1)]]
    tok = tiny_tokenizer([r["prompt"] + r["response"] for r in recs], vocab_size=400)
    return tok, prepare_safekey_dataset(recs, tok, max_length=256)


def test_trainer_resolves_mode_per_model_type(tmp_path: Any, tok_ds: tuple[Any, Any]) -> None:
    tok, ds = tok_ds
    mk = dict(vocab_size=len(tok), **{k: v for k, v in BASE.items() if k != "vocab_size"})
    from transformers import AutoConfig, AutoModelForCausalLM

    def model(model_type: str, **extra: Any) -> Any:
        cfg = AutoConfig.for_model(model_type, **{**mk, **extra})
        return AutoModelForCausalLM.from_config(cfg)

    tr = _trainer(tmp_path / "a", model("mistral", sliding_window=8), tok, ds)
    assert tr.safekey_qmm_mode == "compact" and tr.data_collator.qmm_mode == "compact"
    tr = _trainer(tmp_path / "b", model("llama"), tok, ds, safekey_qmm_mode="masked")
    assert tr.safekey_qmm_mode == "masked" and tr.data_collator([ds[0], ds[1]])["qmm_attention_mask"].dim() == 2
    # a model type that is not tested: auto -> masked, compact refused
    gpt2 = model("gpt2", n_embd=32, n_layer=2, n_head=4)
    assert _trainer(tmp_path / "c", gpt2, tok, ds).safekey_qmm_mode == "masked"
    with pytest.raises(ConfigError, match="model type 'gpt2'"):
        _trainer(tmp_path / "d", gpt2, tok, ds, safekey_qmm_mode="compact")
    # no QMM pass: nothing to refuse
    assert _trainer(tmp_path / "e", gpt2, tok, ds, safekey_qmm_mode="compact", safekey_qmm_weight=0.0)


def test_trainer_passes_head_theta_to_the_loss(tmp_path: Any, tok_ds: tuple[Any, Any], monkeypatch: Any) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_safety_merge.training.safekey import DualPathSafetyHead

    tok, ds = tok_ds
    cfg = AutoConfig.for_model("llama", **{**BASE, "vocab_size": len(tok)})
    with pytest.warns(UserWarning, match="safekey_head_theta=0.7"):
        tr = _trainer(tmp_path, AutoModelForCausalLM.from_config(cfg), tok, ds, safekey_head_theta=0.7, safekey_last_k_epochs=None)
    seen: list[float] = []
    orig = DualPathSafetyHead.loss
    monkeypatch.setattr(DualPathSafetyHead, "loss", staticmethod(lambda lg, y, theta=0.5: seen.append(theta) or orig(lg, y, theta)))
    pooled_from: list[torch.Tensor] = []
    tr.safekey_heads.register_forward_hook(lambda mod, args, out: pooled_from.append(args[0].detach()))
    tr.model.train()
    batch = tr._prepare_inputs(tr.data_collator([ds[0], ds[1]]))
    tr.compute_loss(tr.model, dict(batch))
    assert seen == [0.7]
    # the heads read what the reference's read: `output.hidden_states[-1]` of the SFT forward
    with torch.no_grad():
        ref = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    torch.testing.assert_close(pooled_from[0], ref.hidden_states[-1], atol=1e-6, rtol=0)


def test_head_theta_is_the_reference_weight(tmp_path: Any) -> None:
    import torch.nn.functional as F

    from hf_safety_merge.training import SafeKeyConfig
    from hf_safety_merge.training.safekey import DualPathSafetyHead

    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]])
    y = torch.tensor([1.0, 0.0, 1.0])
    bce_u = F.binary_cross_entropy_with_logits(logits[:, 0], y)  # the reference's L_head_C (pooled over U)
    bce_xu = F.binary_cross_entropy_with_logits(logits[:, 1], y)  # its L_head_ctx (pooled over X+U)
    for theta in (0.0, 0.5, 0.7, 1.0):
        want = theta * bce_u + (1 - theta) * bce_xu
        torch.testing.assert_close(DualPathSafetyHead.loss(logits, y, theta), want)
    torch.testing.assert_close(DualPathSafetyHead.loss(logits, y), 0.5 * bce_u + 0.5 * bce_xu)
    kw = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cfg = SafeKeyConfig(**kw)
    assert (cfg.safekey_head_theta, cfg.safekey_head_accuracy_threshold) == (0.5, 0.5)
    with pytest.warns(UserWarning, match="safekey_head_accuracy_threshold"):
        assert SafeKeyConfig(**kw, safekey_head_theta=0.7).safekey_head_theta == 0.7
    with pytest.raises(ConfigError, match=r"safekey_head_theta must be in \[0, 1\]"):
        SafeKeyConfig(**kw, safekey_head_theta=1.5)
    with pytest.raises(ConfigError, match="safekey_head_accuracy_threshold"):
        SafeKeyConfig(**kw, safekey_head_accuracy_threshold=1.0)
