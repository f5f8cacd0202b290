"""`hf-safety-merge distill | asft | safekey`: TrlParser flags (dataclass fields, YAML keys equal
to the flags), like `trl sft`; the previous distill flags still work, with a deprecation note."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hf_safety_merge import SafetyVector
from hf_safety_merge.cli import main
from hf_safety_merge.testing.distill import make_tiny_chat_model, write_jsonl


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trl-cmd")
    return make_tiny_chat_model(root / "llama", "llama", seed=0), write_jsonl(root / "harmful.jsonl")


def _check_vector(folder: Path, lr: float) -> None:
    vec = SafetyVector.from_pretrained(folder)
    names = list(vec.keys())
    assert {n.split(".")[2] for n in names} == {"0", "1"} and all(".self_attn." in n for n in names)
    assert vec.config.extra["learning_rate"] == lr


def test_distill_trlparser_flags_and_yaml(model_and_data: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, data = model_and_data
    flags = ["--distill_variant", "attn", "--distill_layers", "0", "2", "--max_steps", "2",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
             "--max_grad_norm", "0.5", "--report_to", "none", "--disable_tqdm", "true", "--summary_json", "true"]
    assert main(["distill", "--aligned_model", str(model), "--data", str(data), "--vector_dir", str(tmp_path / "v1"),
                 *flags]) == 0
    out = capsys.readouterr()
    assert "deprecated" not in out.err and f'"output_dir": {json.dumps(str(tmp_path / "v1"))}' in out.out
    _check_vector(tmp_path / "v1", 1e-3)
    # the same as YAML: keys equal the flags
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(yaml.safe_dump({"aligned_model": str(model), "data": str(data), "vector_dir": str(tmp_path / "v2"),
                                   "distill_variant": "attn", "distill_layers": [0, 2], "max_steps": 2,
                                   "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                                   "learning_rate": 2.0e-3, "report_to": "none", "disable_tqdm": True}))
    assert main(["distill", "--config", str(cfg)]) == 0
    _check_vector(tmp_path / "v2", 2e-3)


def test_distill_previous_flags_still_work(model_and_data: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, data = model_and_data
    assert main(["distill", "--aligned", str(model), "--data", str(data), "--out", str(tmp_path / "v"),
                 "--variant", "attn", "--layers", "0", "2", "--max-steps", "2", "--batch-size", "2",
                 "--grad-accum", "1", "--lr", "1e-3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "deprecated" in err and "--epochs" not in err and "--batch-size -> --per_device_train_batch_size" in err
    _check_vector(tmp_path / "v", 1e-3)


def test_distill_needs_model_and_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", "--max_steps", "1"]) == 2
    assert "needs --aligned_model and --data" in capsys.readouterr().err


def test_previous_distill_spellings_are_aliases() -> None:
    from hf_safety_merge.scripts.distill import _rewrite_legacy, make_parser

    argv, notes = _rewrite_legacy(["--aligned", "m", "--push-to-hub", "me/vec", "--epochs", "2",
                                   "--training-arg", "max_grad_norm=0.5", "--push_to_hub", "false"])
    script, cfg = make_parser().parse_args_and_config(args=argv)
    assert script.aligned_model == "m" and script.push_vector_to_hub == "me/vec" and cfg.push_to_hub is False
    assert cfg.num_train_epochs == 2 and cfg.max_grad_norm == 0.5
    assert notes == ["--push-to-hub REPO_ID -> --push_vector_to_hub", "--training-arg max_grad_norm=... -> --max_grad_norm ..."]


def test_distill_subcommand_is_the_trlparser_script(capsys: pytest.CaptureFixture[str]) -> None:
    """`hf-safety-merge distill` hands its command line to `hf_safety_merge.scripts.distill`, as
    `asft` and `safekey` do to theirs."""
    with pytest.raises(SystemExit) as e:
        main(["distill", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-safety-merge distill") and "--distill_variant" in out and "--vector_dir" in out


@pytest.mark.parametrize("name, flag", [("asft", "--asft_lambda"), ("safekey", "--safekey_head_weight")])
def test_asft_and_safekey_subcommands_are_trlparser(name: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-safety-merge {name}") and flag in out and "--learning_rate" in out
    assert "--lora_r" in out and "--dataset_name" in out


def test_asft_subcommand_trains(tmp_path: Path) -> None:
    from test_asft_example import _config
    from test_asft_training import make_tiny_setup

    setup = make_tiny_setup(tmp_path / "setup", n_examples=16)
    cfg = _config(setup, tmp_path, max_steps=2)
    assert main(["asft", "--config", str(cfg), "--output_dir", str(tmp_path / "out"),
                 "--summary_file", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["steps"] == 2 and (tmp_path / "out" / "adapter_model.safetensors").is_file()
