"""Distillation end to end on tiny real models: data, trainer, vector, merge, CLI, data generation;
`DistillConfig` as the one declaration of every setting (API keyword, script flag, YAML key)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.distill import (
    DistillConfig,
    DistillTrainer,
    distill_safety_vector,
    generate_responses,
    load_harmful_qa,
)
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.testing.distill import HARMFUL_QA, make_tiny_chat_model, write_jsonl
from hf_safety_merge.testing.models import perturb


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is faster and immune to a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill-models")
    return {arch: make_tiny_chat_model(root / arch, arch, seed=0) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def harmful_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("distill-data") / "harmful.jsonl")


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --------------------------------------------------------------------------- data
def test_load_harmful_qa_formats_and_errors(tmp_path: Path) -> None:
    csv = tmp_path / "qa.csv"
    csv.write_text('question,answer,extra\n"How to x?","Do y.",1\n"How to z?","",2\n"Why w?","Because.",3\n')
    ds = load_harmful_qa(csv)  # columns found by name (question / answer); empty answer dropped
    assert len(ds) == 2
    assert ds[0]["prompt"] == [{"role": "user", "content": "How to x?"}]
    assert ds[0]["completion"] == [{"role": "assistant", "content": "Do y."}]
    ds = load_harmful_qa(csv, prompt_column="question", response_column="answer", system_prompt="Be brief.", max_samples=1)
    assert len(ds) == 1 and ds[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ConfigError, match=r"qa\.csv: no response column 'anwser'.*did you mean 'answer'"):
        load_harmful_qa(csv, response_column="anwser")
    only_prompts = tmp_path / "p.jsonl"
    only_prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"p\.jsonl: no response column found"):
        load_harmful_qa(only_prompts)
    with pytest.raises(ConfigError, match="not found"):
        load_harmful_qa(tmp_path / "missing.jsonl")


def test_generate_responses_writes_jsonl(chat_models: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "advbench_like.csv"
    prompts.write_text("prompt,categories\n" + "".join(f'"{p}",x\n' for p, _ in HARMFUL_QA[:5]))
    out = generate_responses(chat_models["llama"], prompts, tmp_path / "gen.jsonl", batch_size=2, max_new_tokens=6, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p, _ in HARMFUL_QA[:5]]
    assert all(isinstance(r["response"], str) for r in rows)
    # Left padding gives each row the same greedy answer as generating it alone.
    alone = generate_responses(chat_models["llama"], [HARMFUL_QA[3][0]], tmp_path / "one.jsonl", max_new_tokens=6, progress=False)
    assert json.loads(alone.read_text())["response"] == rows[3]["response"]
    assert len(load_harmful_qa(out)) == len([r for r in rows if r["response"].strip()])


# --------------------------------------------------------------------------- trainer
def test_trainer_masks_prompt_tokens_and_trains_only_blocks(chat_models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = chat_models["qwen2"]
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = load_harmful_qa(write_jsonl(tmp_path / "d.jsonl"))
    args = DistillConfig(
        output_dir=str(tmp_path / "run"), distill_variant="attn", distill_layers=[1, 3], max_steps=2,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, bf16=False,
        use_cpu=True, logging_steps=1, disable_tqdm=True,
    )
    trainer = DistillTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    # Loss on response tokens only: the collator masks every prompt token.
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    prompt_len = len(tok.apply_chat_template(ds[0]["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"])
    assert (labels[:prompt_len] == -100).all() and (labels[prompt_len:] != -100).any()
    assert (labels[labels != -100] == ids[labels != -100]).all()

    trainer.train()
    assert trainer.state.global_step == 2
    expected = {n for n in before if n.startswith(("model.layers.1.self_attn.", "model.layers.2.self_attn."))}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == expected
    vec = trainer.safety_vector(dataset="d.jsonl")
    assert set(vec.keys()) == expected
    for n in expected:  # Delta_s = theta_aligned - theta_harmful
        torch.testing.assert_close(vec[n], before[n] - model.get_parameter(n).detach())
    extra = vec.config.extra
    assert extra["steps"] == 2 and extra["variant"] == "attn" and extra["layers"] == [1, 3]
    assert extra["loss"]["num_logged"] == 2 and extra["effective_batch_size"] == 4
    assert vec.config.method == "ntk_distilled:attn"


# --------------------------------------------------------------------------- API + merge
@pytest.mark.filterwarnings("ignore:distillation variant 'attn' follows:FutureWarning")
@pytest.mark.parametrize("arch,variant", [("llama", "ffn"), ("qwen2", "attn_ffn")])
def test_distill_api_vector_on_exact_tensors_and_merges(
    chat_models: dict[str, Path], harmful_jsonl: Path, tmp_path: Path, arch: str, variant: str
) -> None:
    aligned = chat_models[arch]
    config = DistillConfig(distill_variant=variant, distill_skip_layers=1, max_steps=3, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, learning_rate=1e-3, disable_tqdm=True)
    res = distill_safety_vector(config, aligned, harmful_jsonl, tmp_path / "vec", save_harmful_model=tmp_path / "harmful")
    assert config.output_dir is None  # the caller's config is untouched (a temporary trainer folder was used)
    vec = SafetyVector.from_pretrained(tmp_path / "vec")
    a, h = _all_tensors(aligned), _all_tensors(tmp_path / "harmful")
    want_mlp, want_attn = variant in ("ffn", "attn_ffn"), variant in ("attn", "attn_ffn")
    expected = {
        n for n in a
        if any(f"layers.{i}." in n for i in (1, 2)) and ((want_mlp and ".mlp." in n) or (want_attn and ".self_attn." in n))
    }
    assert set(vec.keys()) == expected
    for n in expected:
        assert float(vec[n].abs().max()) > 0, n
        torch.testing.assert_close(vec[n], a[n] - h[n])
    # Only the chosen tensors changed: the harmful model equals the aligned one everywhere else.
    for n in a:
        if n not in expected:
            assert torch.equal(a[n], h[n]), n
    cfg = vec.config
    assert cfg.method == f"ntk_distilled:{variant}" and cfg.aligned_model == str(aligned)
    assert cfg.extra["dataset"] == str(harmful_jsonl) and cfg.extra["steps"] == 3
    assert cfg.extra["loss"]["num_logged"] == 3 and cfg.extra["train_time_s"] > 0
    card = (tmp_path / "vec" / "README.md").read_text()
    assert "ntk_distilled" in card and "loss:" in card and "harmful.jsonl" in card
    assert "optimiser steps   : 3" in str(res)

    # The vector merges with the engine: patched tensors move, every other tensor is the task's.
    task_dir = tmp_path / "task"
    from transformers import AutoModelForCausalLM

    task = perturb(AutoModelForCausalLM.from_pretrained(aligned), 0.05, seed=7)
    task.save_pretrained(task_dir)
    out = tmp_path / "patched"
    merge(SafetyMergeConfig(task_model=str(task_dir), task_reference=str(aligned), safety_vector=str(tmp_path / "vec"),
                            method="enchtable", output_dir=str(out)), progress=False)
    t, m = _all_tensors(task_dir), _all_tensors(out)
    assert set(m) == set(t)
    for n in t:
        if n in expected:
            assert not torch.equal(t[n], m[n]), n
        else:
            assert torch.equal(t[n], m[n]), n
    AutoModelForCausalLM.from_pretrained(out)  # loads


def test_api_fails_fast_on_bad_inputs(chat_models: dict[str, Path], harmful_jsonl: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        distill_safety_vector(DistillConfig(), chat_models["llama"], harmful_jsonl, tmp_path / "full")
    with pytest.raises(ConfigError, match="did you mean 'hybrid'"):
        DistillConfig(distill_variant="hybird")
    with pytest.raises(ConfigError, match="no prompt column 'question'"):
        distill_safety_vector(DistillConfig(prompt_column="question"), chat_models["llama"], harmful_jsonl, tmp_path / "v")
    with pytest.raises(ConfigError, match="needs a DistillConfig first"):
        distill_safety_vector(chat_models["llama"], harmful_jsonl, tmp_path / "v")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'vector_dtype' = 'flaot16'.*did you mean 'float16'"):
        DistillConfig(vector_dtype="flaot16")


# --------------------------------------------------------------------------- CLI
def test_cli_end_to_end(chat_models: dict[str, Path], harmful_jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hf_safety_merge.scripts.distill.main`: YAML keys and flags are DistillConfig fields; the
    earlier spellings (YAML `aligned:` / `variant:`, `--layers`, `--batch-size`, `--training-arg`) still work."""
    from hf_safety_merge.scripts.distill import main

    cfg = tmp_path / "distill.yaml"
    cfg.write_text(f"aligned: {chat_models['llama']}\ndata: {harmful_jsonl}\nvariant: attn\nlearning_rate: 1.0e-3\n")
    assert main([
        "--config", str(cfg), "--layers", "0", "2", "--max-steps", "2", "--batch-size", "2",
        "--grad-accum", "1", "--out", str(tmp_path / "vec"), "--no-progress",
        "--training-arg", "max_grad_norm=0.5",
    ]) == 0
    out = capsys.readouterr()
    assert "Safety-vector distillation finished" in out.out and "attn on layers [0, 2)" in out.out
    assert "deprecated" in out.err and "aligned -> aligned_model" in out.err and "--out -> --vector_dir" in out.err
    vec = SafetyVector.from_pretrained(tmp_path / "vec")
    assert vec.config.extra["learning_rate"] == 1e-3  # from the YAML
    names = list(vec.keys())
    assert {n.split(".")[2] for n in names} == {"0", "1"} and all(".self_attn." in n for n in names)

    bad = tmp_path / "bad.yaml"
    bad.write_text("aligned_model: x\ndistill_varient: ffn\n")
    with pytest.raises(ConfigError, match="did you mean 'distill_variant'"):
        main(["--config", str(bad)])


def test_cli_distill_data(chat_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_safety_merge.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"goal": p}) + "\n" for p, _ in HARMFUL_QA[:3]))
    assert main([
        "distill-data", "--model", str(chat_models["qwen2"]), "--prompts", str(prompts), "--out",
        str(tmp_path / "gen.jsonl"), "--max-new-tokens", "4", "--no-progress",
    ]) == 0
    assert "wrote 3 (prompt, response) rows" in capsys.readouterr().out


# --------------------------------------------------------------------------- one declaration per setting
#: per field that DistillConfig declares (its own and the SFTConfig ones it re-declares): a value
#: other than the default, as command-line words and as the parsed value
_NON_DEFAULT: dict[str, tuple[list[str], Any]] = {
    "distill_variant": (["attn_ffn"], "attn_ffn"),
    "distill_skip_layers": (["1"], 1),
    "distill_layers": ([], None),  # excludes distill_skip_layers: covered by test_cli_end_to_end
    "distill_mlp_names": (["mlp", "ffn"], ["mlp", "ffn"]),
    "distill_attn_names": (["self_attn", "attention"], ["self_attn", "attention"]),
    "prompt_column": (["prompt"], "prompt"),
    "response_column": (["response"], "response"),
    "data_split": (["everything"], "everything"),  # (split, subset and revision: not used for a file)
    "data_subset": (["sub"], "sub"),
    "data_revision": (["v1"], "v1"),
    "max_samples": (["5"], 5),
    "system_prompt": (["Be brief."], "Be brief."),
    "aligned_revision": (["main"], "main"),
    "attn_implementation": (["eager"], "eager"),
    "distill_vector_rounding": (["bf16"], "bf16"),
    "vector_dtype": (["bfloat16"], "bfloat16"),
    "learning_rate": (["0.002"], 2e-3),
    "lr_scheduler_type": (["constant"], "constant"),
    "warmup_steps": (["0"], 0.0),
    "num_train_epochs": (["2"], 2.0),
    "per_device_train_batch_size": (["2"], 2),
    "gradient_accumulation_steps": (["1"], 1),
    "max_length": (["64"], 64),
    "bf16": (["true"], True),
    "seed": (["3"], 3),
    "logging_steps": (["2"], 2.0),
    "output_dir": ([], None),  # given below (its default None is a temporary folder)
    "disable_tqdm": (["true"], True),
    "gradient_checkpointing": ([], None),  # the deprecated alias of activation_checkpointing
    "activation_checkpointing": (["true"], True),
    "save_strategy": (["steps"], "steps"),
    "report_to": ([], None),  # another value needs a logging integration installed
}


def test_every_setting_is_one_flag_and_reaches_the_trainer(chat_models: dict[str, Path], harmful_jsonl: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each DistillConfig field is exactly one flag of `hf-safety-merge distill` (no second
    declaration in DistillScriptArguments), and a non-default value of each field DistillConfig
    declares, given on the command line, reaches the DistillTrainer that `distill_safety_vector`
    builds and has its effect."""
    import hf_safety_merge.distill.data as data_mod
    from hf_safety_merge.scripts.distill import DistillScriptArguments, distill, make_parser

    script_fields = {f.name for f in dataclasses.fields(DistillScriptArguments)}
    config_fields = [f.name for f in dataclasses.fields(DistillConfig)]
    assert not script_fields & set(config_fields)  # declared once
    parser = make_parser()
    for name in [*config_fields, *script_fields]:
        owners = [a for a in parser._actions if a.dest == name  # (not the `--no_X` complement of a bool defaulting to True)
                  and not all(o.startswith(("--no_", "--no-")) for o in a.option_strings)]
        assert len(owners) == 1 and f"--{name}" in owners[0].option_strings, name
    declared = set(DistillConfig.__annotations__)  # the fields DistillConfig's own class body declares
    assert declared == set(_NON_DEFAULT), sorted(declared ^ set(_NON_DEFAULT))

    argv = ["--aligned_model", str(chat_models["llama"]), "--data", str(harmful_jsonl), "--vector_dir", str(tmp_path / "v"),
            "--max_steps", "1", "--use_cpu", "true", "--output_dir", str(tmp_path / "run")]
    for k, (words, _) in _NON_DEFAULT.items():
        if words:
            argv += [f"--{k}", *words]
    script, config = parser.parse_args_and_config(args=argv)

    seen: dict[str, Any] = {}
    real_load, real_init = data_mod.load_harmful_qa, DistillTrainer.__init__

    def load(source: Any, **kw: Any) -> Any:
        seen["data"] = kw
        return real_load(source, **kw)

    def init(self: Any, model: Any, args: Any = None, **kw: Any) -> None:
        seen["model"], seen["args"], seen["trainer"] = model, args, self
        real_init(self, model, args, **kw)

    monkeypatch.setattr(data_mod, "load_harmful_qa", load)
    monkeypatch.setattr(DistillTrainer, "__init__", init)
    res = distill(script, config)

    args = seen["args"]
    for k, (words, want) in _NON_DEFAULT.items():
        if words:
            got = getattr(args, k)
            got = got.value if hasattr(got, "value") else got
            assert got == want, (k, got, want)
            assert getattr(DistillConfig(), k) != want, k  # a non-default value
    assert args.output_dir == str(tmp_path / "run")
    # ... and each has its effect
    assert seen["data"] == {"prompt_column": "prompt", "response_column": "response", "split": "everything",
                            "subset": "sub", "revision": "v1", "max_samples": 5, "system_prompt": "Be brief.", "seed": 3}
    trainer = seen["trainer"]
    assert seen["model"] == str(chat_models["llama"])  # loaded by the trainer: aligned_revision, attn_implementation
    assert trainer.model.config._attn_implementation == "eager"
    plan = trainer.linearization
    assert plan.variant == "attn_ffn" and plan.layers[0] == 1 and len(plan.blocks) == 2 * (plan.layers[1] - 1)
    assert trainer.optimizer.param_groups[0]["lr"] == 2e-3  # constant schedule, no warmup
    assert trainer.accelerator.gradient_accumulation_steps == 1 and args.activation_checkpointing
    assert trainer.train_dataset.num_rows == 5
    extra = res.vector.config.extra
    assert extra["num_samples"] == 5 and extra["seed"] == 3 and extra["max_length"] == 64 and extra["bf16"]
    assert extra["vector_rounding"] == "bf16" and extra["effective_batch_size"] == 2
    assert extra["lr_scheduler"] == "constant" and extra["warmup"] == 0.0
    saved = _all_tensors(tmp_path / "v")
    names = list(res.vector.keys())
    assert {saved[n].dtype for n in names} == {torch.bfloat16}  # vector_dtype


def test_api_leaves_no_trainer_folder_and_keeps_the_callers_config(chat_models: dict[str, Path], harmful_jsonl: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = DistillConfig(distill_variant="attn", distill_layers=[0, 1], max_steps=1, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, disable_tqdm=True)
    assert config.output_dir is None and not config.bf16 and config.seed == 0 and config.logging_steps == 1
    res = distill_safety_vector(config, chat_models["llama"], harmful_jsonl)
    assert res.output_dir is None and res.vector.config.extra["steps"] == 1
    assert config.output_dir is None and list(tmp_path.iterdir()) == []  # no trainer_output/ left behind


# --------------------------------------------------------------------------- example script
def test_example_config_parses_with_trlparser(tmp_path: Path) -> None:
    import importlib.util

    from trl import TrlParser

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("distill_example", root / "examples" / "distill_safety_vector.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["distill_example"] = mod  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["distill_example"]
    parser = TrlParser((mod.ScriptArguments, DistillConfig))
    with pytest.warns(FutureWarning, match="now called 'attn_block_ffn'"):  # the old name still parses
        script, cfg = parser.parse_args_and_config(
            ["--config", str(root / "examples" / "distill_config.yaml"), "--output_dir", str(tmp_path / "run"),
             "--distill_variant", "hybrid", "--distill_layers", "2", "6", "--use_cpu", "true"]
        )
    assert script.aligned_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg.max_samples == 1000
    assert cfg.distill_variant == "attn_block_ffn" and cfg.distill_layers == [2, 6]
    assert cfg.learning_rate == 1e-5 and cfg.num_train_epochs == 4 and cfg.warmup_steps == 0.1
    assert cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps == 16
    assert str(cfg.lr_scheduler_type.value) == "cosine" and cfg.save_strategy.value == "no"


def test_activation_checkpointing_and_bf16(chat_models: dict[str, Path], tmp_path: Path) -> None:
    """Trainer features come for free: checkpointing recomputes the jvp in backward and gives the
    same vector; bf16 autocast trains the same tensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = chat_models["llama"]
    ds = load_harmful_qa(write_jsonl(tmp_path / "d.jsonl"))
    vectors = {}
    for name, extra in (("plain", {}), ("ckpt", {"activation_checkpointing": True}), ("bf16", {"bf16": True})):
        args = DistillConfig(
            output_dir=str(tmp_path / name), distill_variant="attn_block_ffn", distill_layers=[1, 3], max_steps=2,
            per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True,
            disable_tqdm=True, **{"bf16": False, **extra},
        )
        trainer = DistillTrainer(model=AutoModelForCausalLM.from_pretrained(src), args=args, train_dataset=ds,
                                 processing_class=AutoTokenizer.from_pretrained(src))
        trainer.train()
        vectors[name] = trainer.delta()
    assert set(vectors["ckpt"]) == set(vectors["plain"]) == set(vectors["bf16"])
    for n, t in vectors["plain"].items():
        torch.testing.assert_close(vectors["ckpt"][n], t, rtol=1e-4, atol=1e-7)
        assert float(vectors["bf16"][n].abs().max()) > 0
