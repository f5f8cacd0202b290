"""`distill_vector_rounding="bf16"`: the EnchTable reference's rounding of the safety vector.

The reference saves its harmful model in bf16 (DeepSpeed's bf16 module) and subtracts it from the
bf16 aligned checkpoint, both loaded in fp32 (docs/distillation.md, "Precision"). The option gives
`bf16(theta_aligned) - bf16(theta_harmful)` in fp32; these tests check it against that difference
computed by hand, element by element, and check the half-step rule: from a bf16 aligned weight, an
element that moved less than half a bf16 step is exactly 0, every other one is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_safety_merge import SafetyVector
from hf_safety_merge.distill import (
    DistillConfig,
    DistillTrainer,
    delta_tensors,
    distill_safety_vector,
    load_harmful_qa,
)
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.testing.distill import make_tiny_chat_model, write_jsonl

BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bf16_aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat model saved in bf16, as the reference's aligned checkpoints are (Llama-3-8B-Instruct)."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_chat_model(tmp_path_factory.mktemp("bf16-aligned") / "llama", "llama", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for p in model.parameters():
        p.data = p.data.to(BF16)
    model.save_pretrained(folder)
    assert all(t.dtype == BF16 for t in load_file(folder / "model.safetensors").values())
    return folder


def _half_step_window(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For bf16-representable `a` (held in fp32): the open interval of fp32 values that round to `a`
    in bf16, i.e. the midpoints to its bf16 neighbours below and above (exact in fp32)."""
    ab = a.to(BF16)
    down = torch.nextafter(ab, torch.full_like(ab, float("-inf"))).float()
    up = torch.nextafter(ab, torch.full_like(ab, float("inf"))).float()
    return (a + down) / 2, (a + up) / 2


def test_bf16_rounding_is_the_difference_of_bf16_weights(bf16_aligned: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bf16_aligned, dtype=torch.float32)  # fp32 weights on the bf16 grid
    aligned = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(t, t.to(BF16).float()) for t in aligned.values())
    args = DistillConfig(
        output_dir=str(tmp_path / "run"), distill_variant="ffn", max_steps=2, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, learning_rate=3e-5, lr_scheduler_type="constant", warmup_steps=0,
        bf16=False, use_cpu=True, disable_tqdm=True, distill_vector_rounding="bf16",
    )
    ds = load_harmful_qa(write_jsonl(tmp_path / "d.jsonl"))
    trainer = DistillTrainer(model=model, args=args, train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(bf16_aligned))
    trainer.train()
    vec = trainer.safety_vector(dataset="d.jsonl")
    unrounded = delta_tensors(model, sign=-1.0)
    names = list(vec.keys())
    assert vec.config.extra["vector_rounding"] == "bf16"
    assert set(names) == set(unrounded) and any(".mlp." in n for n in names)

    small_moves = big_moves = 0
    for n in names:
        a, h = aligned[n], model.get_parameter(n).detach()
        by_hand = a.to(BF16).float() - h.to(BF16).float()  # the reference: two bf16 checkpoints, subtracted in fp32
        assert torch.equal(vec[n], by_hand), n
        torch.testing.assert_close(unrounded[n], a - h)  # the default: the fp32 difference
        lo, hi = _half_step_window(a)
        inside = (h > lo) & (h < hi)  # moved less than half a bf16 step (either side)
        outside = (h < lo) | (h > hi)  # more than half a step (ties at exactly half a step left out)
        assert torch.all(vec[n][inside] == 0), n
        assert torch.all(vec[n][outside] != 0), n
        small_moves += int((inside & (h != a)).sum())  # moved in fp32, exactly 0 in the rounded vector
        big_moves += int(outside.sum())
    # both cases occur, so the assertions above can fail
    assert small_moves > 100 and big_moves > 100, (small_moves, big_moves)
    assert any(not torch.equal(vec[n], unrounded[n]) for n in names)


def test_api_records_rounding_and_matches_saved_checkpoints(bf16_aligned: Path, tmp_path: Path) -> None:
    """Through `distill_safety_vector`: the saved vector equals bf16(aligned file) - bf16(harmful file)."""
    config = DistillConfig(distill_variant="attn", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                           learning_rate=3e-5, warmup_steps=0, distill_vector_rounding="bf16", disable_tqdm=True)
    res = distill_safety_vector(config, bf16_aligned, write_jsonl(tmp_path / "d.jsonl"), tmp_path / "vec",
                                save_harmful_model=tmp_path / "harmful")
    vec = SafetyVector.from_pretrained(tmp_path / "vec")
    a, h = load_file(bf16_aligned / "model.safetensors"), load_file(tmp_path / "harmful" / "model.safetensors")
    assert vec.config.extra["vector_rounding"] == "bf16" and "vector rounding   : bf16(theta_aligned)" in str(res)
    zeros = 0
    names = list(vec.keys())
    for n in names:
        assert torch.equal(vec[n], a[n].float().to(BF16).float() - h[n].float().to(BF16).float()), n
        zeros += int((vec[n] == 0).sum())
    assert zeros > 0


def test_bad_rounding_values_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"^distill option 'distill_vector_rounding' = 'bf17': expected one of 'none', 'bf16' \(did you mean 'bf16'\?\)$"):
        DistillConfig(output_dir=str(tmp_path / "run"), distill_vector_rounding="bf17")
    with pytest.raises(ConfigError, match="distill_vector_rounding"):
        DistillConfig(output_dir=str(tmp_path / "run"), distill_vector_rounding=16)  # type: ignore[arg-type]
    # the flag of `hf-safety-merge distill` is the same field: argparse lists its choices
    from hf_safety_merge.scripts.distill import make_parser

    with pytest.raises(SystemExit):
        make_parser().parse_args_and_config(args=["--distill_vector_rounding", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
