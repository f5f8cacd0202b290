from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_safety_merge.cli import main


def test_help_is_followable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("merge", "vector", "methods", "demo", "task_reference", "examples:"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["vector", "compute", "--help"])
    assert "--aligned" in capsys.readouterr().out


def test_console_script_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "hf_safety_merge.cli", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("hf-safety-merge ")


def test_vector_compute_and_merge_from_cli(llama_family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vector", "compute", "--aligned", str(llama_family["aligned"]), "--reference", str(llama_family["harmful"]),
                 "--out", str(tmp_path / "v"), "--scope", "attention", "--dtype", "bfloat16", "--no-progress"]) == 0
    assert "wrote SafetyVector" in capsys.readouterr().out
    assert main(["vector", "info", str(tmp_path / "v")]) == 0
    info = capsys.readouterr().out
    assert '"dtype": "bfloat16"' in info and "self_attn" in info
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"task_model: {llama_family['task']}\ntask_reference: {llama_family['aligned']}\n"
        f"safety_vector: {tmp_path / 'v'}\nmethod: enchtable\nparameters:\n  beta: 0.1\n"
    )
    assert main(["merge", str(cfg), "--out", str(tmp_path / "out"), "--dtype", "float32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Merged with enchtable: 16/39 tensors" in out and "alpha:" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert main(["methods"]) == 0
    assert "enchtable" in capsys.readouterr().out


def test_demo_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| enchtable |" in out and (tmp_path / "demo" / "patched-enchtable" / "README.md").is_file()
