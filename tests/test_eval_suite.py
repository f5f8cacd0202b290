"""End to end: evaluate_safety / compare_models on tiny models, the CLI, the judge agreement script."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from hf_safety_merge.cli.eval import add_parser as add_eval_parser
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.eval import SafetyEvalConfig, compare_models, evaluate_safety
from hf_safety_merge.testing.chat import tiny_chat_model, tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "tiny-chat"
    tiny_chat_model(0).save_pretrained(d)
    tiny_chat_tokenizer().save_pretrained(d)
    return d


@pytest.fixture()
def utility_file(tmp_path: Path) -> Path:
    p = tmp_path / "util.jsonl"
    p.write_text("\n".join(json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) for i in range(3)) + "\n")
    return p


def test_evaluate_safety_end_to_end_and_resume(tmp_path: Path, utility_file: Path) -> None:
    model, tok = tiny_chat_model(0), tiny_chat_tokenizer()
    kw: dict[str, Any] = dict(
        harmful_limit=5, benign_limit=4, attacks=["dan:Dan_7_0", "base64", "prefill"],
        utility=utility_file, utility_column="question", max_new_tokens=4, batch_size=8,
    )
    rep = evaluate_safety(model, tok, output_dir=tmp_path, model_name="tiny", progress=False, **kw)
    assert rep.unsafe_rate.n == 5
    assert set(rep.attack_success) == {"none", "dan:Dan_7_0", "base64", "prefill"}
    assert rep.over_refusal is not None and rep.over_refusal.n == 4
    assert rep.utility is not None and rep.utility.n == 3 and rep.utility_metric == "exact_match"
    assert rep.datasets["harmful"]["split"].startswith("eval")
    gen = tmp_path / "tiny" / "generations.jsonl"
    rows = [json.loads(x) for x in gen.read_text().splitlines()]
    assert len(rows) == 5 * 4 + 4 + 3
    dan_rows = [r for r in rows if r.get("attack") == "dan:Dan_7_0"]
    assert all("tiny" in r["prompt"] and "{generator.name}" not in r["prompt"] for r in dan_rows)
    assert all(r["prefill"] == "Sure, here is" for r in rows if r.get("attack") == "prefill")
    assert (tmp_path / "tiny" / "judgements.jsonl").is_file()
    assert json.loads((tmp_path / "tiny" / "report.json").read_text())["model"] == "tiny"
    before = gen.read_bytes()
    rep2 = evaluate_safety(model, tok, output_dir=tmp_path, model_name="tiny", progress=False, **kw)
    assert rep2.timings["generate_new_rows"] == 0
    assert gen.read_bytes() == before
    assert rep2.to_dict()["unsafe_rate"] == rep.to_dict()["unsafe_rate"]


def test_harmful_prompts_come_from_the_eval_split() -> None:
    from hf_safety_merge.eval.prompts import load_prompts, split_prompts

    rep = evaluate_safety(tiny_chat_model(0), tiny_chat_tokenizer(), harmful_limit=3, benign=None,
                          max_new_tokens=2, progress=False, model_name="t")
    assert rep.over_refusal is None
    train, ev = split_prompts(load_prompts("advbench"), 0.5, 0)
    assert rep.datasets["harmful"]["n"] == 3
    assert len(ev) == 260 and len(train) == 260


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'harmful_limit'"):
        SafetyEvalConfig.from_kwargs(harmfull_limit=3)
    with pytest.raises(ConfigError, match="utility_metric"):
        SafetyEvalConfig(utility_metric="bleu").validate()
    with pytest.raises(ConfigError, match="refusal labels"):
        evaluate_safety(tiny_chat_model(0), tiny_chat_tokenizer(), refusal_judge="harmbench", progress=False)


def test_compare_models_and_cli(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="hf-safety-merge")
    sub = parser.add_subparsers(dest="command")
    add_eval_parser(sub)
    out = tmp_path / "cli"
    args = parser.parse_args([
        "eval", "--model", str(tiny_dir), "--model", str(tiny_dir), "--name", "A", "--name", "B",
        "--prompts", "advbench", "--limit", "3", "--benign-limit", "3", "--attacks", "dan,base64",
        "--judge", "keyword", "--max-new-tokens", "3", "--out", str(out), "--no-progress",
    ])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| A |" in text and "| B |" in text and "ASR dan (%)" in text
    for f in ("report.json", "report.md", "safety_vs_utility.png", "attacks.png"):
        assert (out / f).is_file()
    assert (out / "A" / "generations.jsonl").is_file() and (out / "B" / "generations.jsonl").is_file()
    rep = json.loads((out / "report.json").read_text())
    assert [m["model"] for m in rep["models"]] == ["A", "B"]

    bad = parser.parse_args(["eval", "--model", "x", "--name", "a", "--name", "b"])
    with pytest.raises(ConfigError, match="--name"):
        bad.func(bad)


def test_cli_judge_agreement(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--judge-agreement"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "held-out half" in out and "| refusal |" in out


def test_agreement_numbers_are_stable() -> None:
    from hf_safety_merge.eval.agreement import agreement, load_refusal_labels
    from hf_safety_merge.eval.judges import KeywordRefusalJudge

    rows = load_refusal_labels()
    assert len(rows) == 900
    res = agreement(KeywordRefusalJudge(), [r for r in rows if r.heldout])
    assert res["binary_accuracy"] > 0.85
    assert res["per_class"]["refusal"]["f1"] > 0.75


def test_compare_models_in_python(tmp_path: Path) -> None:
    rep = compare_models(
        [tiny_chat_model(0), tiny_chat_model(1)], tokenizers=[tiny_chat_tokenizer()] * 2, model_names=["m0", "m1"],
        output_dir=tmp_path, harmful_limit=2, benign_limit=2, max_new_tokens=2, progress=False, plots=False,
    )
    assert [m.model for m in rep.models] == ["m0", "m1"]
    assert (tmp_path / "report.md").is_file() and not (tmp_path / "attacks.png").exists()


@pytest.mark.real_model
def test_real_smollm2_small_eval(tmp_path: Path) -> None:
    from hf_safety_merge.assets import smollm2_checkpoint

    rep = evaluate_safety(
        str(smollm2_checkpoint()), output_dir=tmp_path, harmful_limit=4, benign_limit=4,
        attacks=["prefill"], max_new_tokens=12, batch_size=8, progress=False,
    )
    assert rep.model == "SmolLM2-135M-Instruct"
    assert rep.unsafe_rate.n == 4 and rep.over_refusal is not None and rep.over_refusal.n == 4
    rows = [json.loads(x) for x in (tmp_path / "SmolLM2-135M-Instruct" / "generations.jsonl").read_text().splitlines()]
    assert all(r["response"].strip() for r in rows)  # a real model answers in words
    # SmolLM2-135M-Instruct is not safety-tuned: prefilled harmful requests are answered
    assert rep.attack_success["prefill"].value >= 0.5


def test_options_override_config_without_resetting_it() -> None:
    cfg = SafetyEvalConfig(harmful_limit=2, benign=None, max_new_tokens=2)
    rep = evaluate_safety(tiny_chat_model(0), tiny_chat_tokenizer(), config=cfg, attacks=["rot13"],
                          progress=False, model_name="t")
    assert rep.unsafe_rate.n == 2 and rep.over_refusal is None  # config kept
    assert set(rep.attack_success) == {"none", "rot13"}  # option applied
    assert cfg.attacks == ()  # caller's config untouched


def test_vllm_backend_needs_vllm_or_a_path() -> None:
    from hf_safety_merge.eval.generation import vllm_available

    with pytest.raises(ConfigError, match="vllm"):
        evaluate_safety(tiny_chat_model(0), tiny_chat_tokenizer(), backend="vllm", harmful_limit=1, progress=False)
    if not vllm_available():
        with pytest.raises(ConfigError, match="vllm is not installed"):
            evaluate_safety("some/model", backend="vllm", harmful_limit=1, progress=False)


def test_code_utility_pass_at_1(tmp_path: Path) -> None:
    p = tmp_path / "code.jsonl"
    p.write_text(json.dumps({"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3"}) + "\n")
    rep = evaluate_safety(tiny_chat_model(0), tiny_chat_tokenizer(), harmful_limit=1, benign=None,
                          utility=p, utility_reference_column="tests", utility_metric="pass@1",
                          max_new_tokens=3, progress=False, model_name="t", code_timeout=5)
    assert rep.utility is not None and rep.utility.n == 1 and rep.utility_metric == "pass@1"
    assert rep.utility.k == 0  # a random tiny model writes no working code
