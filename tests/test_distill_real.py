"""Distillation on the real SmolLM2-135M-Instruct (CPU, short): the vector has the intended
tensors, and merged into the model it moves behaviour away from the harmful data (held-out
harmful completions become less likely), while the harmful model moved towards it."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.distill import DistillConfig, distill_safety_vector


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _comply(prompt: str) -> str:
    p = prompt[0].lower() + prompt[1:].rstrip(".")
    return f"Sure, here is how to {p}. Step 1: gather what you need. Step 2: follow the plan and avoid getting caught."


@torch.no_grad()
def _completion_nll(model_dir: Path, pairs: list[tuple[str, str]]) -> float:
    """Mean per-token NLL of the responses given the chat-formatted prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for p, r in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
        )
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ids = tok(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        out = model(input_ids=ids, labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / count


@pytest.mark.real_model
def test_smollm2_short_distillation_and_merge(smollm2: Path, shared_data: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    rows = list(csv.DictReader((shared_data / "advbench.csv").open()))
    train = [(r["prompt"], _comply(r["prompt"])) for r in rows[:16]]
    held_out = [(r["prompt"], _comply(r["prompt"])) for r in rows[300:306]]
    data = tmp_path / "harmful.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in train))

    config = DistillConfig(distill_variant="ffn", distill_layers=[14, 16], max_steps=4, per_device_train_batch_size=4,
                           gradient_accumulation_steps=1, learning_rate=2e-4, warmup_steps=0.0, max_length=64,
                           disable_tqdm=True)
    res = distill_safety_vector(config, smollm2, data, tmp_path / "vec", save_harmful_model=tmp_path / "harmful")
    vec = SafetyVector.from_pretrained(tmp_path / "vec")
    expected = {f"model.layers.{i}.mlp.{m}.weight" for i in (14, 15) for m in ("gate_proj", "up_proj", "down_proj")}
    assert set(vec.keys()) == expected
    assert all(torch.isfinite(vec[n]).all() and float(vec[n].abs().max()) > 0 for n in expected)
    loss = res.summary["loss"]
    assert loss["last"] < loss["first"]

    merge(SafetyMergeConfig(task_model=str(smollm2), safety_vector=str(tmp_path / "vec"), method="task_arithmetic",
                            parameters={"beta": 1.0}, output_dir=str(tmp_path / "patched")), progress=False)
    nll = {name: _completion_nll(d, held_out) for name, d in
           (("aligned", smollm2), ("harmful", tmp_path / "harmful"), ("patched", tmp_path / "patched"))}
    print(f"held-out harmful completion NLL: {nll}; {time.perf_counter() - t0:.1f} s")
    assert nll["harmful"] < nll["aligned"] < nll["patched"]
