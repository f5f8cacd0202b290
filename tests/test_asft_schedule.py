"""The AsFT reference's learning-rate schedule and the example config's reference settings.

- `asft_lr_decay_per_epoch` gives, optimiser step by optimiser step, exactly the learning rates of
  the reference's `StepLR(optimizer, step_size=1, gamma)` stepped once after every epoch;
- `examples/asft_config.yaml` sets the reference's precision (fp32), schedule (StepLR 0.85),
  weight decay (0) and clipping (none) explicitly instead of inheriting TRL's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_asft_training import make_tiny_setup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_setup(tmp_path_factory.mktemp("asft-schedule"), n_examples=8)


def _reference_lrs(lr: float, gamma: float, epochs: int, steps_per_epoch: int) -> list[float]:
    """The reference loop: AdamW + StepLR(step_size=1, gamma); `lr_scheduler.step()` after each epoch."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)
    out = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("accum", [1, 2])
def test_step_decay_per_epoch_matches_reference_steplr(setup: dict[str, Path], tmp_path: Path, accum: int) -> None:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from hf_safety_merge import AsFTConfig, AsFTTrainer

    used: list[float] = []

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            used.append(kw["optimizer"].param_groups[0]["lr"])

    ds = load_dataset(str(setup["data"]), split="train")  # 8 examples
    args = AsFTConfig(
        output_dir=str(tmp_path / "out"), asft_base_model=str(setup["base"]), asft_lr_decay_per_epoch=0.85,
        learning_rate=5e-5, num_train_epochs=3, per_device_train_batch_size=2, gradient_accumulation_steps=accum,
        lr_scheduler_type="linear", warmup_steps=0, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        max_length=16, disable_tqdm=True, logging_steps=1,
    )
    trainer = AsFTTrainer(
        model=str(setup["aligned"]), args=args, train_dataset=ds, callbacks=[Record()],
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    steps_per_epoch = 4 // accum
    assert trainer.state.global_step == 3 * steps_per_epoch
    expected = _reference_lrs(5e-5, 0.85, 3, steps_per_epoch)
    assert used == pytest.approx(expected, rel=1e-12, abs=0)
    assert used[0] == 5e-5 and used[-1] == pytest.approx(5e-5 * 0.85**2, rel=1e-12)


def test_step_decay_validation() -> None:
    from hf_safety_merge import AsFTConfig
    from hf_safety_merge.errors import ConfigError

    with pytest.raises(ConfigError, match="asft_lr_decay_per_epoch must be in"):
        AsFTConfig(output_dir="x", use_cpu=True, bf16=False, asft_lr_decay_per_epoch=1.5)


def test_example_config_sets_the_reference_setup_explicitly() -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("train_asft_example", ROOT / "examples" / "train_asft.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_asft_example"] = mod
    try:
        spec.loader.exec_module(mod)
        _script, cfg, model = mod.make_parser().parse_args_and_config(
            ["--config", str(ROOT / "examples" / "asft_config.yaml"), "--use_cpu", "true"]
        )
    finally:
        del sys.modules["train_asft_example"]
    # AsFT_finetuning.py / configs/training.py / scripts/alpaca/AsFT_reg1_p_0.1.sh of PKU-YuanGroup/AsFT
    assert cfg.bf16 is False and cfg.fp16 is False and model.dtype == "float32"  # fp32, not TRL's bf16
    assert cfg.asft_lr_decay_per_epoch == 0.85 and cfg.weight_decay == 0.0  # StepLR(gamma=0.85), wd 0
    assert cfg.max_grad_norm == 0.0  # no gradient clipping in the reference loop
    assert cfg.learning_rate == 5e-5 and cfg.num_train_epochs == 10 and cfg.per_device_train_batch_size == 8
    assert cfg.gradient_accumulation_steps == 1 and cfg.seed == 42 and cfg.dataloader_drop_last is True
    assert cfg.train_sampling_strategy == "sequential"  # DataLoader without a sampler: no shuffling
    assert cfg.asft_lambda == 1.0 and cfg.asft_projector == "safe_lora" and not cfg.asft_include_lora_scaling
    assert model.lora_r == 8 and model.lora_alpha == 32 and model.lora_dropout == 0.05
    assert sorted(model.lora_target_modules) == ["q_proj", "v_proj"]
    assert cfg.max_length == 512
