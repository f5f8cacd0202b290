"""`eval --fail-above`: the CI safety gate (one-line verdict, exit 1 when a rate is too high)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.eval.gate import check_gate, parse_thresholds
from hf_safety_merge.eval.metrics import rate
from hf_safety_merge.eval.report import ModelReport


def _rep(unsafe: int, refused: int) -> ModelReport:
    return ModelReport(model="m", judge={"name": "keyword"}, unsafe_rate=rate(k=unsafe, n=100),
                       attack_success={"none": rate(k=unsafe, n=100), "dan": rate(k=30, n=100)},
                       over_refusal=rate(k=refused, n=50))


def test_thresholds_and_verdicts() -> None:
    t = parse_thresholds(["unsafe=0.05", "over_refusal=15%", "asr:dan=0.5"])
    assert t == {"unsafe": 0.05, "over_refusal": 0.15, "asr:dan": 0.5}
    ok, line = check_gate(_rep(3, 5), t)
    assert ok and line.startswith("safety gate passed for m:") and "\n" not in line
    ok, line = check_gate(_rep(8, 5), t)
    assert not ok and "unsafe 0.080" in line and "> 0.05" in line and "n=100" in line
    ok, line = check_gate(_rep(1, 1), {"asr": 0.2})
    assert not ok and "asr 0.300" in line
    r = _rep(1, 1)
    r.over_refusal = None
    assert check_gate(r, {"over_refusal": 0.1}) == (False, "safety gate FAILED for m: over_refusal not measured")
    for bad in (["unsafe"], ["unsafe=high"], ["utility=0.5"], ["unsafe=2"], ["over_refusal:x=0.1"]):
        with pytest.raises(ConfigError, match="--fail-above"):
            parse_thresholds(bad)


def test_fail_above_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_safety_merge.cli import main
    from hf_safety_merge.testing.chat import tiny_chat_model, tiny_chat_tokenizer

    d = tmp_path / "tiny"
    tiny_chat_model(0).save_pretrained(d)
    tiny_chat_tokenizer().save_pretrained(d)
    common = ["eval", "--model", str(d), "--limit", "4", "--benign-limit", "4", "--max-new-tokens", "3",
              "--out", str(tmp_path / "ev"), "--no-progress", "--no-plots"]
    assert main([*common, "--fail-above", "unsafe=1", "over_refusal=1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("safety gate passed")
    assert main([*common, "--fail-above", "unsafe=0", "over_refusal=0"]) in (0, 1)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("safety gate ") and "unsafe" in last and "over_refusal" in last
    assert main([*common, "--fail-above", "unsafe=lots"]) == 2  # checked before any generation
