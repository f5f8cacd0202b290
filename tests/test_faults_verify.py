"""Silent corruption of local files (issue 35): `merge_report.json` records every output file's
sha256 and every input file (with `--hash-inputs`, their sha256 too); `--verify REPORT` hashes the
local inputs before the merge and refuses, naming the file, when one changed."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.cli import main as cli_main
from hf_safety_merge.errors import ConfigError, IntegrityError
from hf_safety_merge.merge import engine


@pytest.fixture()
def inputs(llama_family: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Copies of the inputs that a test may damage."""
    d = {name: Path(shutil.copytree(llama_family[name], tmp_path / name)) for name in ("task", "aligned")}
    d["vec"] = tmp_path / "vec"
    SafetyVector.compute(d["aligned"], llama_family["harmful"], d["vec"], progress=False, subspaces=False)
    return d


def _cfg(d: dict[str, Path], out: Path) -> SafetyMergeConfig:
    return SafetyMergeConfig(task_model=str(d["task"]), task_reference=str(d["aligned"]), safety_vector=str(d["vec"]),
                             method="task_arithmetic", output_dir=str(out))


def _flip_data_byte(path: Path) -> None:
    """Flip one bit in the middle of the tensor data: the header (and every check on it) stays valid."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    i = 8 + n + (len(raw) - 8 - n) // 2
    raw[i] ^= 0x01
    path.write_bytes(bytes(raw))


def test_report_records_output_hashes_and_inputs(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(_cfg(inputs, out), progress=False)
    files = json.loads((out / "merge_report.json").read_text())["files"]
    assert files["algorithm"] == "sha256"
    outputs = {r["file"]: r for r in files["outputs"]}
    assert set(outputs) == {p.name for p in out.iterdir()} - {"merge_report.json"}
    for name, r in outputs.items():
        data = (out / name).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["bytes"] == len(data)
    # inputs: every file the merge read, with its size; hashed only when asked (docs/reliability.md).
    # task_arithmetic reads no reference, so none is recorded
    got = {(r["role"], r["file"]) for r in files["inputs"]}
    assert {("task_model", "model.safetensors"), ("task_model", "config.json"),
            ("safety_vector", "safety_vector.safetensors"), ("safety_vector", "safety_vector_config.json")} <= got
    assert {role for role, _ in got} == {"task_model", "safety_vector"}
    assert all("sha256" not in r and r["bytes"] == Path(r["path"]).stat().st_size for r in files["inputs"])

    out2 = tmp_path / "out2"
    merge(_cfg(inputs, out2), progress=False, hash_inputs=True)
    for r in json.loads((out2 / "merge_report.json").read_text())["files"]["inputs"]:
        assert r["sha256"] == hashlib.sha256(Path(r["path"]).read_bytes()).hexdigest()


@pytest.mark.parametrize("damaged", ["task", "vec"])
def test_verify_refuses_a_changed_input(inputs: dict[str, Path], tmp_path: Path, damaged: str,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "merge.yaml"
    cfg_file.write_text(yaml.safe_dump({"task_model": str(inputs["task"]), "task_reference": str(inputs["aligned"]),
                                        "safety_vector": str(inputs["vec"]), "method": "task_arithmetic"}))
    first = tmp_path / "first"
    assert cli_main(["merge", str(cfg_file), str(first), "--hash-inputs", "--no-progress"]) == 0
    report = first / "merge_report.json"

    # unchanged inputs: verified, merged
    assert cli_main(["merge", str(cfg_file), str(tmp_path / "second"), "--verify", str(report), "--no-progress"]) == 0
    assert f"verified the local input files against {report}" in capsys.readouterr().out

    victim = inputs[damaged] / ("model.safetensors" if damaged == "task" else "safety_vector.safetensors")
    _flip_data_byte(victim)
    computed: list[str] = []
    monkeypatch.setattr(engine, "_global_pass", lambda *a, **k: computed.append("x"))
    out = tmp_path / "third"
    assert cli_main(["merge", str(cfg_file), str(out), "--verify", str(report), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    role = "task_model" if damaged == "task" else "safety_vector"
    assert err[0].startswith(f"error: {victim}: sha256 "), err[0]
    assert f"recorded in {report} for the {role} file '{victim.name}': the file changed since that merge" in err[0]
    assert computed == [] and not out.exists(), "refused before the merge starts"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]

    # the API: the same refusal; the report's folder is accepted too
    with pytest.raises(IntegrityError, match=str(victim)):
        merge(_cfg(inputs, out), progress=False, verify=first)


def test_verify_needs_recorded_input_hashes(inputs: dict[str, Path], tmp_path: Path) -> None:
    first = tmp_path / "first"
    merge(_cfg(inputs, first), progress=False)  # default: outputs hashed, inputs not
    with pytest.raises(ConfigError, match=r"records no sha256 of input files; it was written without --hash-inputs"):
        merge(_cfg(inputs, tmp_path / "second"), progress=False, verify=first / "merge_report.json")
    with pytest.raises(ConfigError, match=r"verify: cannot read .*missing\.json"):
        merge(_cfg(inputs, tmp_path / "second"), progress=False, verify=tmp_path / "missing.json")
    assert not (tmp_path / "second").exists()
