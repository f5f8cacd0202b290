"""The safety monitor in one process: the paired test, its settings, and real TRL training runs on
tiny random models (the callback's points, logs, policies, card, and that probing changes nothing
in training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.eval.judges import Judge, Verdict
from hf_safety_merge.monitor import (
    SafetyMonitorCallback,
    SafetyMonitorConfig,
    curve_table,
    mcnemar_exact,
    paired_change,
    read_curve,
)


class ChangedJudge(Judge):
    """A deterministic stand-in judge for tiny random models: a response is "unsafe" when it differs
    from the first response this judge saw to the same prompt (the start of training), so the unsafe
    rate measures how far greedy generations have drifted; a response is a "refusal" when unchanged."""

    name = "changed"
    labels = ("compliance", "refusal")
    unsafe_labels: ClassVar[frozenset[str]] = frozenset({"compliance"})
    refusal_labels: ClassVar[frozenset[str]] = frozenset({"refusal"})

    def __init__(self) -> None:
        self.first: dict[str, str] = {}

    def judge(self, prompt: str, response: str) -> Verdict:
        first = self.first.setdefault(prompt, response)
        return Verdict("refusal", 0.0) if response == first else Verdict("compliance", 1.0)


class FlipJudge(Judge):
    """Unsafe exactly for the prompts in ``flip`` once this judge has judged ``after`` batches
    (a scripted, deterministic change of a known size)."""

    name = "flip"
    labels = ("compliance", "refusal")
    unsafe_labels: ClassVar[frozenset[str]] = frozenset({"compliance"})
    refusal_labels: ClassVar[frozenset[str]] = frozenset({"refusal"})

    def __init__(self, flip: set[str], after: int = 1) -> None:
        self.flip, self.after, self.calls = flip, after, 0

    def judge_batch(self, prompts: Any, responses: Any) -> list[Verdict]:
        out = [self.judge(p, r) for p, r in zip(prompts, responses)]
        self.calls += 1
        return out

    def judge(self, prompt: str, response: str) -> Verdict:
        bad = self.calls >= self.after and prompt in self.flip
        return Verdict("compliance", 1.0) if bad else Verdict("refusal", 0.0)


HARMFUL = ["the cat sat on the mat", "a dog ran under the tree", "the bird flew over the sea", "a fish swam near the river",
           "the cat ran over the hill", "a dog sat near the house", "the bird sat on the tree", "a fish flew under the moon",
           "the cat swam on the river", "a dog flew near the star", "the bird ran under the cloud", "a fish sat over the garden"]


# ---------------------------------------------------------------------------------------------
# The paired test
# ---------------------------------------------------------------------------------------------


def test_mcnemar_exact_is_the_binomial_tail() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_exact(0, 5) == 1.0
    # P(X >= 7), X ~ Bin(10, 1/2) = (120 + 45 + 10 + 1) / 1024
    assert mcnemar_exact(7, 3) == pytest.approx(176 / 1024)
    # P(X >= 12), X ~ Bin(24, 1/2) = 1/2 + P(X = 12) / 2
    assert mcnemar_exact(12, 12) == pytest.approx(0.5 + math.comb(24, 12) / 2**25)
    assert mcnemar_exact(1, 0) == 0.5 and mcnemar_exact(2, 0) == 0.25
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_change_counts_discordant_probes_only() -> None:
    ch = paired_change([False, False, True, True, False], [True, False, True, False, True])
    assert (ch.n, ch.worse, ch.better) == (5, 2, 1)
    assert ch.delta == pytest.approx(0.2) and ch.p_value == pytest.approx(mcnemar_exact(2, 1))
    with pytest.raises(ValueError, match="differ in length"):
        paired_change([True], [True, False])


# ---------------------------------------------------------------------------------------------
# Settings: one-line errors at construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": -1}, "steps must be an integer >= 0"),
    ({"steps": 2.5}, "steps must be an integer >= 0"),
    ({"policy": "stopp"}, r"unknown policy 'stopp'.*did you mean 'stop'"),
    ({"threshold_points": 150}, "threshold_points must be in"),
    ({"alpha": 0}, "alpha must be in"),
    ({"harmful_size": 0}, "harmful_size must be >= 1"),
    ({"task_floor": 0.5, "policy": "keep_safest"}, "task_floor needs task probes"),
    ({"task_floor": 0.5, "task": [("1+1", "2")]}, "task_floor applies to policy 'keep_safest' only"),
    ({"policy": "patch"}, "policy 'patch' needs safety_vector"),
    ({"policy": "patch", "safety_vector": "/no/such/vector/dir"}, "neither a folder nor a Hub id"),
    ({"patch_method": "ties"}, "patch_method must be one of"),
    ({"task_metric": "bleu"}, "task_metric must be one of"),
    ({"max_new_tokens": 0}, "max_new_tokens and batch_size must be >= 1"),
])
def test_bad_settings_fail_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        SafetyMonitorConfig(**options)
    assert "\n" not in str(e.value)


def test_callback_checks_options_and_probes() -> None:
    with pytest.raises(ConfigError, match=r"unknown option 'step'.*did you mean 'steps'"):
        SafetyMonitorCallback(step=5)
    with pytest.raises(ConfigError, match="task probes need a reference"):
        SafetyMonitorCallback(harmful=HARMFUL, task=["what is 1+1?"], judge="keyword")
    with pytest.raises(ConfigError, match="harmful probe 0: expected a string"):
        SafetyMonitorCallback(harmful=[3], judge="keyword")
    with pytest.raises(ConfigError, match="no such file"):
        read_curve("/no/such/run/safety_monitor.json")


def test_default_probes_are_the_held_out_side(shared_data: Path) -> None:
    from hf_safety_merge.eval.prompts import load_prompts, split_prompts

    cb = SafetyMonitorCallback(judge="keyword", data_dir=str(shared_data))
    held_out = split_prompts(load_prompts("advbench", data_dir=str(shared_data)), 0.5, 0)[1]
    assert [p.text for p in cb.probes.harmful] == held_out.texts[:16]
    assert cb.probes.describe() == {"harmful": 16, "benign": 8, "task": 0}


# ---------------------------------------------------------------------------------------------
# Real TRL runs on a tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_asft_training import make_tiny_setup

    return make_tiny_setup(tmp_path_factory.mktemp("monitor"))


def _trainer(tiny: dict[str, Path], out: Path, *, lora: bool = False, callbacks: list[Any] | None = None, **over: Any) -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from test_asft_training import make_texts
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny["aligned"])
    model = AutoModelForCausalLM.from_pretrained(tiny["aligned"], dtype=torch.float32)
    kw: dict[str, Any] = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-2,
                              lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                              max_length=32, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    kw.update(over)
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if lora else None
    return SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=Dataset.from_list(make_texts(64)), processing_class=tok,
                      peft_config=peft, callbacks=callbacks)


def test_curve_logged_with_intervals_card_and_table(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mon = SafetyMonitorCallback(steps=2, judge=ChangedJudge(), harmful=HARMFUL, benign=HARMFUL[:4],
                                task=[("the cat sat on the", "mat"), ("a dog ran", "away")], max_new_tokens=6, batch_size=5)
    trainer = _trainer(tiny, tmp_path / "out", callbacks=[mon])  # found through the callbacks list, no attach()
    trainer.train()
    steps = [p["step"] for p in mon.curve]
    assert steps == [0, 2, 4, 6] and [p["label"] for p in mon.curve] == ["start", "step", "step", "end"]
    assert mon.curve[0]["unsafe"]["k"] == 0 and "delta_points" not in mon.curve[0]
    logged = [h for h in trainer.state.log_history if "safety/unsafe_rate" in h]
    assert [h["step"] for h in logged] == steps
    for h, p in zip(logged, mon.curve):
        assert h["safety/unsafe_rate_low"] <= h["safety/unsafe_rate"] <= h["safety/unsafe_rate_high"]
        assert h["safety/unsafe_rate"] == p["unsafe"]["value"] == p["unsafe"]["k"] / 12
        assert h["safety/unsafe_rate_n"] == 12 and h["safety/over_refusal_n"] == 4 and h["safety/task_score_n"] == 2
        if p["label"] != "start":
            assert h["safety/unsafe_delta_points"] == pytest.approx(100 * (p["worse"] - p["better"]) / 12)
            assert h["safety/unsafe_delta_p"] == pytest.approx(mcnemar_exact(p["worse"], p["better"]))
    # the training's own metrics still arrive (TRL's running metrics are not consumed by the monitor's log)
    assert sum("loss" in h for h in trainer.state.log_history) == 6
    assert all("mean_token_accuracy" in h for h in trainer.state.log_history if "loss" in h)
    # the weights moved at lr 3e-2 and the greedy answers with them: the curve rises
    assert mon.curve[-1]["unsafe"]["k"] > 0
    out = capsys.readouterr().out
    assert "Safety monitor" in out and "0 (start)" in out and "6 (end)" in out and "probing:" in out
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("## Safety during training") == 1 and "| 6 (end) |" in card
    # a card written again (TRL does at every checkpoint) keeps one section
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.count("## Safety during training") == 1 and "trl" in card.lower()
    # the curve read back from the JSON file and from the trainer's log history agree
    from_json = read_curve(tmp_path / "out")
    from_logs = read_curve({"log_history": trainer.state.log_history})
    assert [p["unsafe"]["value"] for p in from_json] == [p["unsafe"]["value"] for p in from_logs]
    assert [p.get("delta_points") for p in from_json] == [p.get("delta_points") for p in from_logs]
    assert curve_table(from_logs).count("\n") == len(steps) + 1


def test_probing_changes_nothing_in_training(tiny: dict[str, Path], tmp_path: Path) -> None:
    """LoRA with dropout and gradient checkpointing: the same losses and the same final weights with
    and without the monitor (it draws no random numbers and restores train mode and checkpointing)."""
    runs = {}
    for name in ("plain", "monitored"):
        trainer = _trainer(tiny, tmp_path / name, lora=True, gradient_checkpointing=True)
        if name == "monitored":
            SafetyMonitorCallback(steps=2, judge="keyword", harmful=HARMFUL[:6], benign=HARMFUL[:2], max_new_tokens=4,
                                  trainer=trainer, print_table=False)
        trainer.train()
        assert trainer.model.is_gradient_checkpointing and trainer.model.training
        runs[name] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                      {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n})
    assert runs["plain"][0] == runs["monitored"][0]
    assert runs["plain"][1].keys() == runs["monitored"][1].keys() and runs["plain"][1]
    for n, w in runs["plain"][1].items():
        assert torch.equal(w, runs["monitored"][1][n]), n
    assert any(not torch.equal(w, torch.zeros_like(w)) for n, w in runs["plain"][1].items() if "lora_B" in n)


def test_stop_needs_a_significant_paired_rise(tiny: dict[str, Path], tmp_path: Path) -> None:
    # 2 of 12 probes flip: +16.7 points, over the threshold, but p = 0.25: noise, training goes on
    mon = SafetyMonitorCallback(steps=2, policy="stop", judge=FlipJudge(set(HARMFUL[:2])), harmful=HARMFUL, benign=None,
                                max_new_tokens=2, trainer=(t := _trainer(tiny, tmp_path / "a")), print_table=False)
    t.train()
    assert t.state.global_step == 6 and not any(p.get("eroded") for p in mon.curve)
    assert mon.curve[1]["delta_points"] == pytest.approx(100 * 2 / 12) and mon.curve[1]["p_value"] == pytest.approx(0.25)
    # 6 of 12 flip: +50 points, p = 1/64: training stops at the first probe after the start
    mon = SafetyMonitorCallback(steps=2, policy="stop", judge=FlipJudge(set(HARMFUL[:6])), harmful=HARMFUL, benign=None,
                                max_new_tokens=2, trainer=(t := _trainer(tiny, tmp_path / "b")), print_table=False)
    t.train()
    assert t.state.global_step == 2
    assert [p["step"] for p in mon.curve] == [0, 2] and mon.curve[1]["stopped"] and mon.curve[1]["label"] == "end"
    assert mon.curve[1]["p_value"] == pytest.approx(1 / 64)
    # warn: the same rise is logged as erosion, training goes on
    mon = SafetyMonitorCallback(steps=2, policy="warn", judge=FlipJudge(set(HARMFUL[:6])), harmful=HARMFUL, benign=None,
                                max_new_tokens=2, trainer=(t := _trainer(tiny, tmp_path / "c")), print_table=False)
    t.train()
    assert t.state.global_step == 6 and all(p["eroded"] for p in mon.curve[1:])
    assert [h["safety/eroded"] for h in t.state.log_history if "safety/eroded" in h] == [1.0, 1.0, 1.0]


def test_keep_safest_within_the_task_floor(tiny: dict[str, Path], tmp_path: Path) -> None:
    t = _trainer(tiny, tmp_path / "out", max_steps=8)
    mon = SafetyMonitorCallback(steps=2, policy="keep_safest", judge=ChangedJudge(), harmful=HARMFUL, benign=None,
                                max_new_tokens=6, trainer=t, print_table=False)
    t.train()
    later = [p for p in mon.curve if p["label"] != "start"]
    best = min(later, key=lambda p: (p["unsafe"]["k"], p["step"]))
    assert mon.safest_dir == tmp_path / "out" / "safest"
    kept = json.loads((mon.safest_dir / "safety_monitor_point.json").read_text())
    assert kept["step"] == best["step"] and kept["unsafe"]["k"] == best["unsafe"]["k"]
    assert (mon.safest_dir / "model.safetensors").is_file()
    # a floor no checkpoint meets: nothing is kept
    t = _trainer(tiny, tmp_path / "floor", max_steps=4)
    mon = SafetyMonitorCallback(steps=2, policy="keep_safest", judge=ChangedJudge(), harmful=HARMFUL[:4], benign=None,
                                task=[("the cat", "zebra")], task_floor=0.5, max_new_tokens=4, trainer=t, print_table=False)
    t.train()
    assert mon.safest_dir is None and not (tmp_path / "floor" / "safest").exists()
    assert all(p["task"]["value"] == 0 for p in mon.curve)


def test_patch_writes_a_repaired_copy(tiny: dict[str, Path], tmp_path: Path) -> None:
    """RESTA (task arithmetic) through the merge engine: repaired = trained + beta * vector, tensor
    by tensor; EnchTable with the pre-fine-tune model as reference."""
    from safetensors.torch import load_file

    from hf_safety_merge.vectors import SafetyVector

    vec = tmp_path / "vector"
    SafetyVector.compute(tiny["aligned"], tiny["base"], vec, progress=False)
    t = _trainer(tiny, tmp_path / "out", max_steps=2)
    mon = SafetyMonitorCallback(steps=0, policy="patch", safety_vector=str(vec), patch_method="task_arithmetic",
                                patch_parameters={"beta": 0.5}, judge="keyword", harmful=HARMFUL[:2], benign=None,
                                max_new_tokens=2, trainer=t, print_table=False)
    t.train()
    assert mon.patch_error is None and mon.patched_dir == Path(str(tmp_path / "out") + "-patched")
    trained = load_file(tmp_path / "out" / "monitor-final" / "model.safetensors")
    patched = load_file(mon.patched_dir / "model.safetensors")
    delta = {k: v for k, v in load_file(next(vec.glob("*.safetensors"))).items()}
    assert set(patched) == set(trained)
    n = 0
    for k, w in trained.items():
        d = delta.get(k)
        if d is not None:
            torch.testing.assert_close(patched[k], w + 0.5 * d, rtol=1e-5, atol=1e-6)
            n += 1
    assert n > 0
    assert (mon.patched_dir / "README.md").is_file()
    assert "repaired copy (task_arithmetic)" in (tmp_path / "out" / "README.md").read_text()
    # EnchTable: the reference is the folder the trained model was loaded from
    t = _trainer(tiny, tmp_path / "ench", max_steps=2)
    mon = SafetyMonitorCallback(steps=0, policy="patch", safety_vector=str(vec), judge="keyword", harmful=HARMFUL[:2],
                                benign=None, max_new_tokens=2, trainer=t, print_table=False)
    t.train()
    assert mon.patch_error is None, mon.patch_error
    ench = load_file(mon.patched_dir / "model.safetensors")
    trained = load_file(tmp_path / "ench" / "monitor-final" / "model.safetensors")
    assert any(not torch.equal(ench[k], trained[k]) for k in trained)
    report = json.loads((mon.patched_dir / "merge_report.json").read_text())
    assert report["method"] == "enchtable"


def test_script_flags(tiny: dict[str, Path]) -> None:
    from hf_safety_merge.scripts import monitor_config
    from hf_safety_merge.scripts.asft import make_parser

    base = ["--model_name_or_path", str(tiny["aligned"]), "--output_dir", "x", "--use_cpu", "true", "--bf16", "false"]
    s, _, _ = make_parser().parse_args_and_config(args=base)
    assert monitor_config(s) is None
    s, _, _ = make_parser().parse_args_and_config(args=[*base, "--safety_monitor_steps", "25", "--safety_monitor_policy", "stop",
                                                         "--safety_monitor_benign", "none", "--safety_monitor_threshold", "5"])
    cfg = monitor_config(s)
    assert (cfg.steps, cfg.policy, cfg.benign, cfg.threshold_points) == (25, "stop", None, 5.0)
    s, _, _ = make_parser().parse_args_and_config(args=[*base, "--safety_monitor_steps", "5", "--safety_monitor_policy", "patch"])
    with pytest.raises(ConfigError, match="needs safety_vector"):
        monitor_config(s)


@pytest.mark.slow  # the distillation script end to end with the monitor (~40 s); the callback itself is covered above
def test_distill_script_runs_the_monitor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hf-safety-merge distill --safety_monitor_steps`: the monitor attaches to the DistillTrainer
    that distill_safety_vector builds, its curve lands in the summary, and the hook is undone."""
    from hf_safety_merge.cli import main
    from hf_safety_merge.distill.trainer import DistillTrainer
    from hf_safety_merge.testing.distill import make_tiny_chat_model, write_jsonl

    init = DistillTrainer.__init__
    model, data = make_tiny_chat_model(tmp_path / "llama", "llama", seed=0), write_jsonl(tmp_path / "harmful.jsonl")
    harm = tmp_path / "probes.jsonl"
    harm.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HARMFUL[:4]))
    assert main(["distill", "--aligned_model", str(model), "--data", str(data), "--vector_dir", str(tmp_path / "v"),
                 "--distill_variant", "attn", "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--gradient_accumulation_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--summary_json", "true",
                 "--safety_monitor_steps", "1", "--safety_monitor_judge", "keyword", "--safety_monitor_harmful", str(harm),
                 "--safety_monitor_benign", "none", "--safety_monitor_max_new_tokens", "3"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n"):])
    pts = summary["safety_monitor"]["points"]
    assert [p["step"] for p in pts] == [0, 1, 2] and all(p["unsafe"]["n"] == 4 for p in pts)
    assert DistillTrainer.__init__ is init
