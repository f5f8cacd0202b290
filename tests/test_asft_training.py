"""AsFT on a real (tiny, random) Llama with PEFT LoRA, trained by the real TRL trainers, offline.

- with a large lambda the off-basin part of the LoRA update stays near zero while the in-basin
  part grows like unregularised training;
- with lambda 0 `AsFTTrainer` equals `SFTTrainer` step for step (same losses, same weights);
- gradient accumulation: lambda means the same per optimiser step;
- the mixin (drift, Safe LoRA projection) works on a plain PeftModel, no trainer.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from hf_safety_merge.testing.models import make_tiny_model, perturb

WORDS = ["the", "a", "cat", "dog", "bird", "fish", "sat", "ran", "flew", "swam", "on", "under", "over", "near", "mat", "tree", "sky", "sea", "red", "blue", "green", "small", "big", "happy", "sad", "quickly", "slowly", "and", "then", "again", "today", "yesterday", "house", "garden", "river", "hill", "sun", "moon", "star", "cloud", "rain"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)


def make_tokenizer() -> Any:
    """A word-level tokenizer built in memory (no download), with pad/eos and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_texts(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))} for _ in range(n)]


def make_tiny_setup(root: Path, n_examples: int = 64) -> dict[str, Path]:
    """base and aligned tiny Llama checkpoints (aligned = base + a seeded perturbation), a tokenizer
    saved next to each, and a local `train.jsonl` data set folder."""
    from hf_safety_merge.testing.models import save

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    base = make_tiny_model("llama", 0, **TINY)
    paths = {"base": save(base, root / "base")}
    aligned = perturb(make_tiny_model("llama", 0, **TINY), 0.1, 1)
    paths["aligned"] = save(aligned, root / "aligned")
    for p in paths.values():
        tok.save_pretrained(p)
    data = root / "data"
    data.mkdir(exist_ok=True)
    with open(data / "train.jsonl", "w") as f:
        for row in make_texts(n_examples):
            f.write(json.dumps(row) + "\n")
    paths["data"] = data
    return paths


def lora_model(path: Path, seed: int = 0, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def train_args(cls: type, out: Path, **overrides: Any) -> Any:
    kw: dict[str, Any] = dict(
        output_dir=str(out),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=32,
    )
    kw.update(overrides)
    return cls(**kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_setup(tmp_path_factory.mktemp("asft-tiny"))


@pytest.fixture(scope="module")
def dataset(setup: dict[str, Path]) -> Any:
    from datasets import load_dataset

    return load_dataset(str(setup["data"]), split="train")


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def _losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_lambda_zero_equals_sft_trainer(setup: dict[str, Path], dataset: Any, tmp_path: Path) -> None:
    from trl import SFTConfig, SFTTrainer

    from hf_safety_merge.training import AsFTConfig, AsFTTrainer

    tok = make_tokenizer()
    sft_model = lora_model(setup["aligned"])
    sft = SFTTrainer(model=sft_model, args=train_args(SFTConfig, tmp_path / "sft"), train_dataset=dataset, processing_class=tok)
    sft.train()

    asft_model = lora_model(setup["aligned"])
    args = train_args(AsFTConfig, tmp_path / "asft", asft_lambda=0.0, asft_base_model=str(setup["base"]))
    asft = AsFTTrainer(model=asft_model, args=args, train_dataset=dataset, processing_class=tok)
    asft.train()

    assert len(_losses(sft)) == 8
    assert _losses(asft) == _losses(sft)  # bit-identical, step for step
    s1, s2 = _lora_state(sft_model), _lora_state(asft_model)
    assert s1.keys() == s2.keys() and s1
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    # the penalty is still logged (and grows from 0: B starts at zero)
    pens = [h["asft/penalty"] for h in asft.state.log_history if "asft/penalty" in h]
    assert len(pens) == 8 and pens[0] == 0.0 and pens[-1] > 0.0
    assert all(h["asft/penalty_share"] == 0.0 for h in asft.state.log_history if "asft/penalty_share" in h)


def _run_asft(setup: dict[str, Path], dataset: Any, out: Path, lam: float, **kw: Any) -> tuple[Any, dict[str, dict[str, float]]]:
    from hf_safety_merge.training import AsFTConfig, AsFTTrainer, add_safety_mixin

    model = add_safety_mixin(lora_model(setup["aligned"]))
    opts: dict[str, Any] = dict(
        asft_lambda=lam,
        asft_base_model=str(setup["base"]),
        asft_projector="topk",
        asft_projector_rank=4,
        optim="sgd",
        learning_rate=0.5,
        max_steps=20,
    )
    opts.update(kw)  # callers may override any default (e.g. max_steps)
    args = train_args(AsFTConfig, out, **opts)
    trainer = AsFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=make_tokenizer())
    trainer.train()
    model.attach_alignment_anchors(trainer.asft_anchors)
    return trainer, model.alignment_components(include_lora_scaling=False)


def _in_off(comp: dict[str, dict[str, float]]) -> tuple[float, float]:
    return (
        sum(c["in_basin"] ** 2 for c in comp.values()) ** 0.5,
        sum(c["off_basin"] ** 2 for c in comp.values()) ** 0.5,
    )


def test_large_lambda_keeps_update_in_basin(setup: dict[str, Path], dataset: Any, tmp_path: Path) -> None:
    """AdamW (the default optimiser), lambda = 40: the off-basin part of `B A` stays near zero while
    the in-basin part keeps growing.

    Measured (session 2): lambda 0 gives in 0.74 / off 3.25 after 20 steps; lambda 40 gives in 0.084
    / off 0.018. The in-basin part of the free run is *not* a fair bar: with k = 4 of 64 output
    directions, a random update of norm 3.3 already projects ~0.8 onto the basin, so the test asks
    that the regularised update grows inside the basin and is mostly made of it, not that it matches
    the free run's projection. (Plain SGD with lr 0.5 is unstable for lambda >~ 8 on this model:
    lr * 2 lambda * ||A A^T|| > 2; the penalty then shrinks A and with it everything.)
    """
    adam = dict(optim="adamw_torch", learning_rate=1e-2)
    _, free = _run_asft(setup, dataset, tmp_path / "free", 0.0, **adam)
    _, mid = _run_asft(setup, dataset, tmp_path / "mid", 40.0, max_steps=10, **adam)
    trainer, held = _run_asft(setup, dataset, tmp_path / "held", 40.0, **adam)
    in_free, off_free = _in_off(free)
    in_mid, off_mid = _in_off(mid)
    in_held, off_held = _in_off(held)
    print(f"lambda=0: in {in_free:.4g} off {off_free:.4g}; lambda=40: 10 steps in {in_mid:.4g} off {off_mid:.4g}, "
          f"20 steps in {in_held:.4g} off {off_held:.4g}")
    assert in_free > 0 and off_free > 0
    assert off_held < 0.05 * off_free  # the off-basin part stays near zero ...
    assert in_held > 1.2 * in_mid > 0  # ... while the in-basin part grows
    assert off_held < 0.5 * in_held  # the regularised update is mostly in the basin
    assert off_free > 2 * in_free  # (the free one is mostly outside it)
    logged = [h for h in trainer.state.log_history if "asft/penalty" in h]
    assert logged and all(0.0 <= h["asft/penalty_share"] <= 1.0 for h in logged)
    assert logged[-1]["asft/weighted_penalty"] == pytest.approx(40.0 * logged[-1]["asft/penalty"])


def test_gradient_accumulation_keeps_lambda_per_step(setup: dict[str, Path], dataset: Any, tmp_path: Path) -> None:
    """batch 4 x 2 accumulation steps == batch 8 in one step: same penalty trajectory."""
    a, _ = _run_asft(setup, dataset, tmp_path / "ga1", 5.0, per_device_train_batch_size=8, max_steps=6)
    b, _ = _run_asft(setup, dataset, tmp_path / "ga2", 5.0, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6)
    pa = [h["asft/penalty"] for h in a.state.log_history if "asft/penalty" in h]
    pb = [h["asft/penalty"] for h in b.state.log_history if "asft/penalty" in h]
    assert len(pa) == len(pb) == 6
    assert pa[-1] > 0
    for x, y in zip(pa, pb):
        assert y == pytest.approx(x, rel=1e-3, abs=1e-7)
    la, lb = _losses(a), _losses(b)
    for x, y in zip(la, lb):
        assert y == pytest.approx(x, rel=1e-3)


def test_mixin_without_trainer(setup: dict[str, Path], tmp_path: Path) -> None:
    from hf_safety_merge.training import SafetyPeftMixin, add_safety_mixin

    model = lora_model(setup["aligned"])
    cls = type(model)
    model = add_safety_mixin(model)
    assert isinstance(model, SafetyPeftMixin) and isinstance(model, cls)
    cache = tmp_path / "anchors.safetensors"
    names = model.attach_alignment_anchors(base=setup["base"], cache_path=cache)  # aligned: the model's own checkpoint
    assert cache.is_file() and len(names) == 2 * 4
    # B = 0 at init: no drift
    assert all(v == 0.0 for v in model.alignment_drift().values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    drift = model.alignment_drift()
    assert set(drift) == set(names) and all(v > 0 for v in drift.values())
    # the differentiable penalty matches the drift (without the LoRA scaling, squared)
    p = model.alignment_penalty()
    no_scale = model.alignment_drift(include_lora_scaling=False)
    assert float(p) == pytest.approx(sum(v**2 for v in no_scale.values()), rel=1e-5)

    # Safe LoRA projection: modules under the threshold get B <- C B, the others are untouched
    before = _lora_state(model)
    report = model.project_to_safety_basin(threshold=0.2)
    assert set(report) == set(names)
    comps_after = model.alignment_components()
    for name, r in report.items():
        key = f"{name}.lora_B.default.weight"
        if r["projected"]:
            assert not torch.equal(before[key], model.get_parameter(key))
            # the update is now C D: projecting again changes nothing beyond C (C D) for a projector; here
            # just check the in-basin fraction went up
            assert comps_after[name]["cosine"] >= float(r["cosine"]) - 1e-6
        else:
            assert torch.equal(before[key], model.get_parameter(key))
    # the cached anchors are reused and anchors never enter the adapter state dict
    again = add_safety_mixin(lora_model(setup["aligned"]))
    again.attach_alignment_anchors(cache)
    assert not any("anchor" in k for k in again.state_dict())
    # "number" mode: project exactly the 3 lowest-cosine modules
    rep = model.project_to_safety_basin(threshold=None, num_projected=3)
    assert sum(bool(r["projected"]) for r in rep.values()) == 3


def test_topk_projection_zeroes_drift(setup: dict[str, Path]) -> None:
    from hf_safety_merge.training import add_safety_mixin

    model = add_safety_mixin(lora_model(setup["aligned"]))
    model.attach_alignment_anchors(aligned=setup["aligned"], base=setup["base"], projector="topk", k=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.project_to_safety_basin(threshold=1.0)  # project everything
    assert max(model.alignment_drift().values()) < 1e-5


def test_config_and_trainer_errors(setup: dict[str, Path], dataset: Any, tmp_path: Path) -> None:
    from hf_safety_merge.errors import ConfigError
    from hf_safety_merge.training import AsFTConfig, AsFTTrainer

    with pytest.raises(ConfigError, match="asft_projector 'top_k'"):
        train_args(AsFTConfig, tmp_path, asft_projector="top_k")
    with pytest.raises(ConfigError, match="asft_lambda"):
        train_args(AsFTConfig, tmp_path, asft_lambda=-1.0)
    # no base checkpoint and no anchors file
    with pytest.raises(ConfigError, match="base"):
        AsFTTrainer(model=lora_model(setup["aligned"]), args=train_args(AsFTConfig, tmp_path), train_dataset=dataset, processing_class=make_tokenizer())
    # no LoRA at all
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(setup["aligned"])
    with pytest.raises(ConfigError, match="no LoRA"):
        AsFTTrainer(model=plain, args=train_args(AsFTConfig, tmp_path, asft_base_model=str(setup["base"])), train_dataset=dataset, processing_class=make_tokenizer())


def test_bf16_gradient_checkpointing_all_projections(setup: dict[str, Path], dataset: Any, tmp_path: Path) -> None:
    """LoRA on q/k/v/o/gate/up/down, bf16 autocast and gradient checkpointing: the penalty stays in
    float32 (the anchors' dtype), is finite, grows from 0 and pulls the off-basin part down."""
    from hf_safety_merge.training import AsFTConfig, AsFTTrainer

    all_proj = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def run(lam: float, out: Path) -> Any:
        model = lora_model(setup["aligned"], targets=all_proj)
        args = train_args(AsFTConfig, out, asft_lambda=lam, asft_base_model=str(setup["base"]), bf16=True,
                          gradient_checkpointing=True, max_steps=6)
        tr = AsFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=make_tokenizer())
        tr.train()
        return tr

    held = run(20.0, tmp_path / "held")
    assert len(held.asft_bindings) == 2 * len(all_proj)
    assert held.asft_penalty().dtype == torch.float32
    pens = [h["asft/penalty"] for h in held.state.log_history if "asft/penalty" in h]
    assert len(pens) == 6 and pens[0] == 0.0 and all(math.isfinite(p) for p in pens) and pens[-1] > 0
    assert all(math.isfinite(h["loss"]) for h in held.state.log_history if "loss" in h)
    free = run(0.0, tmp_path / "free")
    assert sum(held.asft_drift().values()) < 0.5 * sum(free.asft_drift().values())
