"""Bad input gets a clear error naming the file/tensor/field, before any merge work, and no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_safety_merge import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    PlanError,
    SafetyMergeConfig,
    SafetyVector,
    merge,
)
from hf_safety_merge.cli import main as cli_main
from hf_safety_merge.testing.models import make_family, make_tiny_model, save


@pytest.fixture(scope="module")
def vec(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vec") / "vec"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False)
    return out


def _edit_vector(vec: Path, dst: Path, fn, *, keep_config: bool = False) -> Path:  # type: ignore[no-untyped-def]
    """Copy a vector and edit its tensors; the config's tensor list follows the edit unless
    `keep_config` (then config and files disagree)."""
    shutil.copytree(vec, dst)
    t = load_file(dst / "safety_vector.safetensors")
    fn(t)
    save_file(t, dst / "safety_vector.safetensors", metadata={"format": "pt"})
    if not keep_config:
        cfg_file = dst / "safety_vector_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["tensor_norms"] = {n: float(x.double().norm()) for n, x in t.items()}
        cfg["num_tensors"] = len(t)
        cfg_file.write_text(json.dumps(cfg))
    return dst


def _cfg(fam: dict[str, Path], vec: Path, out: Path, **kw) -> SafetyMergeConfig:  # type: ignore[no-untyped-def]
    return SafetyMergeConfig(task_model=str(fam["task"]), task_reference=str(fam["aligned"]),
                             safety_vector=str(vec), output_dir=str(out), **kw)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} should not exist after a failed merge"
    leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]
    assert not leftovers, leftovers


def test_mismatched_architecture(llama_family: dict[str, Path], tmp_path: Path) -> None:
    qwen = make_family(tmp_path / "qwen", "qwen2")
    qvec = tmp_path / "qvec"
    SafetyVector.compute(qwen["aligned"], qwen["harmful"], qvec, progress=False)
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"architecture mismatch.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        merge(_cfg(llama_family, qvec, out), progress=False)
    _assert_nothing_written(out)


def test_shape_mismatch_names_tensor_and_files(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"

    def grow(t: dict[str, torch.Tensor]) -> None:
        t[name] = torch.zeros(t[name].shape[0] + 1, t[name].shape[1])

    bad = _edit_vector(vec, tmp_path / "bad", grow)
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=rf"shape mismatch for '{name}': task model \[256, 128\].*\[257, 128\].*safety_vector\.safetensors"):
        merge(_cfg(llama_family, bad, out), progress=False)
    _assert_nothing_written(out)


def test_vocabulary_mismatch_is_explained(tmp_path: Path) -> None:
    small = make_family(tmp_path / "a", "llama")
    big = make_tiny_model("llama", 0, vocab_size=1030)
    save(big, tmp_path / "bigtask")
    v = tmp_path / "v"
    SafetyVector.compute(small["aligned"], small["harmful"], v, progress=False)
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"vocabulary sizes differ \(1030 vs 1024\)"):
        merge(SafetyMergeConfig(task_model=str(tmp_path / "bigtask"), task_reference=str(tmp_path / "bigtask"),
                                safety_vector=str(v), output_dir=str(out)), progress=False)
    _assert_nothing_written(out)


def test_missing_tensor(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    bad = _edit_vector(vec, tmp_path / "bad", lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(2, 2)))
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight'.*missing from the task model"):
        merge(_cfg(llama_family, bad, out), progress=False)
    _assert_nothing_written(out)


def test_missing_tensor_in_reference(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    shutil.copytree(llama_family["aligned"], ref)
    t = load_file(ref / "model.safetensors")
    del t["model.norm.weight"]
    save_file(t, ref / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=r"'model\.norm\.weight'.*missing from the reference"):
        merge(SafetyMergeConfig(task_model=str(llama_family["task"]), task_reference=str(ref),
                                safety_vector=str(vec), output_dir=str(out)), progress=False)
    _assert_nothing_written(out)


@pytest.mark.parametrize("method", ["enchtable", "task_arithmetic"])
def test_nan_in_vector(llama_family: dict[str, Path], vec: Path, tmp_path: Path, method: str) -> None:
    name = "model.layers.3.self_attn.o_proj.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[name][3, 4] = float("nan")

    bad = _edit_vector(vec, tmp_path / "bad", poison)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=rf"'{name}'.*NaN"):
        merge(_cfg(llama_family, bad, out, method=method), progress=False)
    _assert_nothing_written(out)


def test_truncated_shard(llama_family_sharded: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    task = tmp_path / "task"
    shutil.copytree(llama_family_sharded["task"], task)
    shard = sorted(task.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*truncated"):
        merge(SafetyMergeConfig(task_model=str(task), task_reference=str(llama_family_sharded["aligned"]),
                                safety_vector=str(vec), output_dir=str(out)), progress=False)
    _assert_nothing_written(out)


def test_missing_shard_file(llama_family_sharded: dict[str, Path], tmp_path: Path) -> None:
    task = tmp_path / "task"
    shutil.copytree(llama_family_sharded["task"], task)
    victim = sorted(task.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"missing.*{victim.name}"):
        SafetyVector.compute(task, llama_family_sharded["aligned"], tmp_path / "v", progress=False)
    _assert_nothing_written(tmp_path / "v")


def test_unknown_method_and_parameter(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown merge method 'enchtabel'.*did you mean 'enchtable'"):
        _cfg(llama_family, vec, tmp_path / "o", method="enchtabel")
    with pytest.raises(ConfigError, match=r"unknown parameter 'lamda' for method 'enchtable'.*did you mean 'lam'"):
        _cfg(llama_family, vec, tmp_path / "o", parameters={"lamda": 3})
    with pytest.raises(ConfigError, match=r"parameter .gamma. = 2: must be less than or equal to 1"):
        _cfg(llama_family, vec, tmp_path / "o", parameters={"gamma": 2})


def test_misspelt_config_key_in_yaml(llama_family: dict[str, Path], vec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    y = tmp_path / "merge.yaml"
    y.write_text(f"task_model: {llama_family['task']}\nsafety_vectr: {vec}\nmethod: enchtable\n")
    with pytest.raises(ConfigError, match=r"merge\.yaml: unknown config key 'safety_vectr' \(did you mean 'safety_vector'\?\)"):
        SafetyMergeConfig.from_file(y)
    assert cli_main(["merge", str(y), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "safety_vectr" in err and "Traceback" not in err
    _assert_nothing_written(tmp_path / "out")


def test_method_needing_reference_without_one(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    cfg = SafetyMergeConfig(task_model=str(llama_family["task"]), safety_vector=str(vec), output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="task_reference"):
        merge(cfg, progress=False)
    _assert_nothing_written(tmp_path / "o")


def test_non_empty_output_needs_overwrite(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        merge(_cfg(llama_family, vec, out, method="task_arithmetic"), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    merge(_cfg(llama_family, vec, out, method="task_arithmetic", overwrite=True), progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_pickle_checkpoints_need_opt_in(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    task = tmp_path / "bin_task"
    task.mkdir()
    shutil.copy(llama_family["task"] / "config.json", task / "config.json")
    torch.save(load_file(llama_family["task"] / "model.safetensors"), task / "pytorch_model.bin")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*arbitrary code.*allow_pickle=True"):
        merge(SafetyMergeConfig(task_model=str(task), task_reference=str(llama_family["aligned"]),
                                safety_vector=str(vec), output_dir=str(out)), progress=False)
    _assert_nothing_written(out)
    res = merge(SafetyMergeConfig(task_model=str(task), task_reference=str(llama_family["aligned"]),
                                  safety_vector=str(vec), output_dir=str(out), allow_pickle=True), progress=False)
    assert res.num_merged == 30 and (out / "model.safetensors").is_file()


def test_tied_embeddings_with_lm_head_in_vector(tmp_path: Path) -> None:
    untied = make_family(tmp_path / "u", "llama")
    tied = make_tiny_model("llama", 0, tie_word_embeddings=True)
    save(tied, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    v = tmp_path / "v"
    SafetyVector.compute(untied["aligned"], untied["harmful"], v, progress=False)
    with pytest.raises(PlanError, match=r"'lm_head\.weight'.*tie_word_embeddings"):
        merge(SafetyMergeConfig(task_model=str(tmp_path / "tied"), task_reference=str(tmp_path / "tied"),
                                safety_vector=str(v), output_dir=str(tmp_path / "o")), progress=False)


def test_bad_adapter(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        merge(SafetyMergeConfig(task_model=str(llama_family["aligned"]), task_adapter=str(ad),
                                safety_vector=str(vec), output_dir=str(tmp_path / "o")), progress=False)
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 128),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              ad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj: B @ A has shape \(64, 128\) but base weight .* has \(128, 128\)"):
        merge(SafetyMergeConfig(task_model=str(llama_family["aligned"]), task_adapter=str(ad),
                                safety_vector=str(vec), output_dir=str(tmp_path / "o")), progress=False)
    _assert_nothing_written(tmp_path / "o")


def test_nonexistent_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        SafetyVector.compute(tmp_path / "nope", tmp_path / "nope2", tmp_path / "v", progress=False)
    with pytest.raises(ConfigError, match="config file not found"):
        SafetyMergeConfig.from_file(tmp_path / "missing.yaml")


# =============================================================================================
# The catalogue (docs/reliability.md lists it): each case asserts the exit status, that the
# message names the culprit in one line, that nothing was left behind and, where the headers
# suffice, that no tensor bytes were read.
# =============================================================================================
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import yaml  # noqa: E402

from hf_safety_merge import HubError, apply_safety_vector, push_folder  # noqa: E402
from hf_safety_merge.io.safetensors_stream import TensorReader  # noqa: E402


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fails the test if any tensor bytes are read from a safetensors file."""
    reads: list[str] = []

    def forbidden(self, info):  # type: ignore[no-untyped-def]
        reads.append(info.name)
        raise AssertionError(f"tensor bytes were read: {info.name}")

    monkeypatch.setattr(TensorReader, "read", forbidden)
    yield reads
    assert not reads


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli_main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line_error(err: str, *culprits: str) -> None:
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for c in culprits:
        assert c in err, (c, err)


def _write_cfg(tmp_path: Path, fam: dict[str, Path], vec: Path, out: Path, extra: str) -> Path:
    y = tmp_path / "merge.yaml"
    y.write_text(f"task_model: {fam['task']}\ntask_reference: {fam['aligned']}\nsafety_vector: {vec}\n"
                 f"output_dir: {out}\n" + textwrap.dedent(extra))
    return y


BAD_VALUES = [
    ("parameters: {beta: '0.1'}", "'beta' = '0.1' (a quoted string"),
    ("parameters: {beta: -1}", "'beta' = -1: must be greater than 0"),
    ("parameters: {beta: 0}", "'beta' = 0: must be greater than 0"),
    ("parameters: {beta: 1e6}", "'beta' = 1000000.0: must be less than or equal to 100"),
    ("parameters: {beta: .nan}", "'beta' = nan: must be a finite number"),
    ("parameters: {gamma: '0.5'}", "'gamma' = '0.5' (a quoted string"),
    ("parameters: {gamma: 0}", "'gamma' = 0: must be greater than 0"),
    ("parameters: {lam: -2}", "'lam' = -2: must be greater than or equal to 0"),
    ("parameters: {backend: qr}", "'backend' = 'qr': must be 'svd' or 'gram'"),
    ("method: ties\nparameters: {density: 0}", "'density' = 0: must be greater than 0"),
    ("method: dare\nparameters: {density: 1.5}", "'density' = 1.5: must be less than or equal to 1"),
    ("method: safe_lora\nparameters: {num_proj_layers: 2.5}", "'num_proj_layers' = 2.5: must be a valid integer"),
    ("method: safe_lora\nparameters: {select: threshold, threshold: 2}", "'threshold' = 2"),
    ("method: task_arithmetic\nparameters: {beta: true}", "'beta' = True: must be a valid number"),
    ("allow_pickle: 'false'", "'allow_pickle' = 'false' (a quoted string; write true or false"),
    ("overwrite: 'no'", "'overwrite' = 'no'"),
    ("allow_non_finite: 1", "'allow_non_finite' = 1: must be a valid boolean"),
    ("dtype: fp16", "'dtype' must be one of"),
    ("max_shard_size: -3", "max_shard_size"),
    ("max_shard_size: lots", "cannot parse size 'lots'"),
    ("device: gpu", "'device' must be 'cpu', 'cuda' or 'cuda:N'"),
    ("parameters: [0.1]", "'parameters' = [0.1]: must be a valid dictionary"),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_VALUES, ids=[b[0].split("\n")[-1] for b in BAD_VALUES])
def test_catalogue_bad_values_refused_before_any_read(
    llama_family: dict[str, Path], vec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_tensor_reads: list[str], extra: str, expected: str,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")  # `overwrite: 'no'` must not delete it
    y = _write_cfg(tmp_path, llama_family, vec, out, extra)
    rc, err = _run_cli(["merge", str(y)], capsys)
    assert rc == 2
    _one_line_error(err, expected, "merge.yaml")
    assert (out / "mine.txt").read_text() == "user data" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_catalogue_yaml_numbers_in_exponent_notation_are_numbers(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    y = _write_cfg(tmp_path, llama_family, vec, tmp_path / "o", "parameters: {beta: 1e-1, lam: 2E+2}")
    cfg = SafetyMergeConfig.from_file(y)
    assert cfg.parameters == {"beta": 0.1, "lam": 200.0}


def _poison(src: Path, dst: Path, name: str, value: float = float("nan")) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    t = load_file(f)
    t[name] = t[name].clone()
    t[name].view(-1)[7] = value
    save_file(t, f, metadata={"format": "pt"})
    return dst


NAME = "model.layers.2.mlp.down_proj.weight"


@pytest.mark.parametrize(("where", "method", "expected"), [
    ("task", "enchtable", f"task model tensor '{NAME}'"),
    ("reference", "enchtable", f"reference tensor '{NAME}'"),
    ("task", "task_arithmetic", f"task model tensor '{NAME}'"),
    ("task", "ties", f"task model tensor '{NAME}'"),
    ("reference", "safe_lora", f"reference tensor '{NAME}'"),
    ("task-1d", "task_arithmetic", "task model tensor 'model.norm.weight'"),
])
def test_catalogue_non_finite_inputs_refused(
    llama_family: dict[str, Path], vec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    where: str, method: str, expected: str,
) -> None:
    task, ref = llama_family["task"], llama_family["aligned"]
    if where == "task":
        task = _poison(task, tmp_path / "task", NAME)
    elif where == "task-1d":
        task = _poison(task, tmp_path / "task", "model.norm.weight", float("inf"))
    else:
        ref = _poison(ref, tmp_path / "ref", NAME)
    out = tmp_path / "out"
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"task_model": str(task), "task_reference": str(ref), "safety_vector": str(vec),
                                 "method": method, "output_dir": str(out)}))
    rc, err = _run_cli(["merge", str(y), "--no-progress"], capsys)
    assert rc == 2
    _one_line_error(err, expected, "NaN/Inf", "model.safetensors", "allow_non_finite")
    _assert_nothing_written(out)


def test_catalogue_non_finite_allowed_passes_through_with_warning(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    task = _poison(llama_family["task"], tmp_path / "task", NAME)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=rf"task model tensor '{NAME}'.*passed through"):
        res = merge(SafetyMergeConfig(task_model=str(task), task_reference=str(llama_family["aligned"]), safety_vector=str(vec),
                                      method="task_arithmetic", output_dir=str(out), allow_non_finite=True), progress=False)
    assert res.summary["non_finite_passed_through"] == 1
    merged = load_file(out / "model.safetensors")
    assert int(torch.isnan(merged[NAME]).sum()) == 1
    assert json.loads((out / "merge_report.json").read_text())["non_finite"]


def test_catalogue_non_finite_lora_adapter(llama_family: dict[str, Path], vec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    a = torch.randn(2, 128)
    a[0, 3] = float("nan")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(128, 2)},
              ad / "adapter_model.safetensors")
    out = tmp_path / "out"
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"task_model": str(llama_family["aligned"]), "task_adapter": str(ad),
                                 "safety_vector": str(vec), "output_dir": str(out)}))
    rc, err = _run_cli(["merge", str(y), "--no-progress"], capsys)
    assert rc == 2
    _one_line_error(err, "LoRA update of 'model.layers.0.self_attn.q_proj.weight'", "NaN/Inf")
    _assert_nothing_written(out)


def test_catalogue_float16_overflow_is_refused(llama_family: dict[str, Path], tmp_path: Path) -> None:
    big = tmp_path / "bigvec"
    SafetyVector.from_tensors({NAME: torch.full((128, 256), 7e4)}).save_pretrained(big)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=rf"merged tensor '{NAME}' is not finite in the output dtype F16 \(overflow"):
        merge(SafetyMergeConfig(task_model=str(llama_family["task"]), safety_vector=str(big), method="task_arithmetic",
                                dtype="float16", output_dir=str(out)), progress=False)
    _assert_nothing_written(out)


@pytest.mark.parametrize("case", ["under_a_file", "is_a_file", "is_the_task_model", "contains_the_vector"])
def test_catalogue_output_location_checked_first(
    llama_family: dict[str, Path], vec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_tensor_reads: list[str], case: str,
) -> None:
    task = tmp_path / "task"
    shutil.copytree(llama_family["task"], task)
    v = tmp_path / "vecs" / "v"
    shutil.copytree(vec, v)
    (tmp_path / "afile").write_text("x")
    out, expected = {
        "under_a_file": (tmp_path / "afile" / "out", "is a file, so no folder can be created under it"),
        "is_a_file": (tmp_path / "afile", "exists and is a file"),
        "is_the_task_model": (task, "is (or contains) the input"),
        "contains_the_vector": (tmp_path / "vecs", "is (or contains) the input"),
    }[case]
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"task_model": str(task), "task_reference": str(llama_family["aligned"]),
                                 "safety_vector": str(v), "output_dir": str(out), "overwrite": True}))
    before = sorted(p.name for p in task.iterdir())
    rc, err = _run_cli(["merge", str(y)], capsys)
    assert rc == 2
    _one_line_error(err, str(out), expected)
    assert sorted(p.name for p in task.iterdir()) == before and (v / "safety_vector.safetensors").is_file()
    assert (tmp_path / "afile").read_text() == "x"


def test_catalogue_vector_config_and_files_disagree(llama_family: dict[str, Path], vec: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str], no_tensor_reads: list[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(vec, bad)
    cfg = json.loads((bad / "safety_vector_config.json").read_text())
    cfg["tensor_norms"]["model.layers.9.mlp.gate_proj.weight"] = 1.0
    (bad / "safety_vector_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"task_model": str(llama_family["task"]), "task_reference": str(llama_family["aligned"]),
                                 "safety_vector": str(bad), "output_dir": str(out)}))
    rc, err = _run_cli(["merge", str(y)], capsys)
    assert rc == 2
    _one_line_error(err, "safety_vector_config.json", "missing from the files", "'model.layers.9.mlp.gate_proj.weight'")
    _assert_nothing_written(out)


def test_catalogue_config_json_not_an_object(llama_family: dict[str, Path], vec: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], no_tensor_reads: list[str]) -> None:
    task = tmp_path / "task"
    shutil.copytree(llama_family["task"], task)
    (task / "config.json").write_text("[1, 2]")
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"task_model": str(task), "task_reference": str(llama_family["aligned"]),
                                 "safety_vector": str(vec), "output_dir": str(tmp_path / "out")}))
    rc, err = _run_cli(["merge", str(y)], capsys)
    assert rc == 2
    _one_line_error(err, "config.json", "expected a JSON object")
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("method", ["enchtable", "task_arithmetic"])
def test_catalogue_in_memory_api_is_atomic(llama_family: dict[str, Path], vec: Path, tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_family["task"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    last = sorted(SafetyVector.from_pretrained(vec).keys())[-1]  # poison a tensor merged late

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[last].view(-1)[0] = float("nan")

    bad = _edit_vector(vec, tmp_path / "bad", poison)
    with pytest.raises(NonFiniteError, match=rf"'{last}'"):
        apply_safety_vector(model, str(bad), method=method, task_reference=str(llama_family["aligned"]), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model was changed by a failed patch"
    res = apply_safety_vector(model, str(vec), method=method, task_reference=str(llama_family["aligned"]), progress=False)
    assert res.num_merged == 30 and not torch.equal(before[last], model.state_dict()[last])


def test_catalogue_output_folder_permissions_follow_umask(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        merge(_cfg(llama_family, vec, out, method="task_arithmetic"), progress=False)
        assert (out.stat().st_mode & 0o777) == 0o755
        v2 = tmp_path / "v2"
        SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], v2, progress=False)
        assert (v2.stat().st_mode & 0o777) == 0o755
    finally:
        os.umask(old)


_SLOW_MERGE = """
import pathlib, sys, time
from hf_safety_merge.io.safetensors_stream import StreamingShardWriter
orig = StreamingShardWriter.write
def slow(self, name, t):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(0.3)
    return orig(self, name, t)
StreamingShardWriter.write = slow
from hf_safety_merge.cli import main
sys.exit(main(["merge", sys.argv[2], "--no-progress"]))
"""


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_catalogue_signals_leave_nothing_behind(llama_family: dict[str, Path], vec: Path, tmp_path: Path, sig: int, code: int) -> None:
    out = tmp_path / "out"
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"task_model": str(llama_family["task"]), "safety_vector": str(vec),
                                 "method": "task_arithmetic", "output_dir": str(out)}))
    flag = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, str(flag), str(y)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().startswith("interrupted") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------ Hub
@pytest.fixture
def dead_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """An endpoint on 127.0.0.1 where nothing listens (a closed port)."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    return endpoint


SECRET = "hf_catalogueSecretToken0123456789"


@pytest.mark.parametrize("token", [True, False])
def test_catalogue_push_to_unreachable_hub_is_one_line(
    dead_hub: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, token: bool,
) -> None:
    if token:
        monkeypatch.setenv("HF_TOKEN", SECRET)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    folder = tmp_path / "patched"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    rc, err = _run_cli(["push", "me/patched", str(folder)], capsys)
    assert rc == 2
    _one_line_error(err, "me/patched")
    assert (dead_hub in err and "cannot reach the Hub" in err) if token else "no Hub token" in err
    assert SECRET not in err
    with pytest.raises(HubError) as e:
        push_folder(folder, "me/patched")
    assert len(str(e.value).splitlines()) == 1 and SECRET not in str(e.value)


def test_catalogue_merge_then_push_checks_the_hub_first(
    dead_hub: str, llama_family: dict[str, Path], vec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, no_tensor_reads: list[str],
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    y = _write_cfg(tmp_path, llama_family, vec, tmp_path / "out", "push_to_hub: me/patched\n")
    rc, err = _run_cli(["merge", str(y)], capsys)
    assert rc == 2
    _one_line_error(err, "me/patched", dead_hub, "push check")
    _assert_nothing_written(tmp_path / "out")


def test_catalogue_relative_path_typo_says_both_readings(
    dead_hub: str, llama_family: dict[str, Path], vec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    y = tmp_path / "m.yaml"
    y.write_text(yaml.safe_dump({"task_model": "fam/tsk", "task_reference": str(llama_family["aligned"]),
                                 "safety_vector": str(vec), "output_dir": str(tmp_path / "out")}))
    rc, err = _run_cli(["merge", str(y)], capsys)
    assert rc == 2
    _one_line_error(err, "fam/tsk", dead_hub, "not a local path either", str(tmp_path / "fam" / "tsk"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: read from the (empty) cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc, err = _run_cli(["merge", str(y)], capsys)
    assert rc == 2
    _one_line_error(err, "fam/tsk", "not in the local HF cache", "not a local path either")


# ------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize("case", ["no_tokenizer", "missing_path", "empty_csv", "header_only_csv"])
def test_catalogue_eval_errors_are_one_line(llama_family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           case: str) -> None:
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\nHow do I pick a lock?\nTell me a joke.\n")
    model = str(llama_family["task"])
    expected = {"no_tokenizer": "has no tokenizer", "missing_path": "no such local folder",
                "empty_csv": "is empty", "header_only_csv": "is empty"}[case]
    if case == "missing_path":
        model = str(tmp_path / "nope" / "model")
    elif case == "empty_csv":
        prompts.write_text("")
    elif case == "header_only_csv":
        prompts.write_text("prompt\n")
    rc, err = _run_cli(["eval", "--model", model, "--prompts", str(prompts), "--benign", "none", "--eval-split", "all",
                        "--out", str(tmp_path / "ev"), "--no-progress", "--no-plots"], capsys)
    assert rc == 2
    _one_line_error(err, expected)


def test_catalogue_eval_study_and_distill_configs_are_typed() -> None:
    from hf_safety_merge.distill.trainer import DistillConfig
    from hf_safety_merge.eval.suite import SafetyEvalConfig
    from hf_safety_merge.study import StudyConfig

    with pytest.raises(ConfigError, match=r"evaluation option 'max_new_tokens' = 0: must be greater than 0"):
        SafetyEvalConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match=r"evaluation option 'harmful_eval_size' = 1.5"):
        SafetyEvalConfig(harmful_eval_size=1.5)
    with pytest.raises(ConfigError, match=r"evaluation option 'backend' = 'tf'"):
        SafetyEvalConfig(backend="tf")
    with pytest.raises(ConfigError, match=r"study option 'align_lr' = '1e-4' \(a quoted string"):
        StudyConfig.preset("demo", align_lr="1e-4")
    with pytest.raises(ConfigError, match=r"study option 'enchtable_betas' = \[0.1, -1\]: item 1 must be greater than 0"):
        StudyConfig.preset("demo", enchtable_betas=[0.1, -1])
    with pytest.raises(ConfigError, match=r"study option 'device' = 'gpu'"):
        StudyConfig(device="gpu")
    with pytest.raises(ConfigError, match=r"distill option 'distill_skip_layers' = -1"):
        DistillConfig(output_dir="unused", bf16=False, distill_skip_layers=-1)
    with pytest.raises(ConfigError, match=r"distill option 'learning_rate' = '1e-5' \(a quoted string"):
        DistillConfig(output_dir="unused", bf16=False, learning_rate="1e-5")
    with pytest.raises(ConfigError, match=r"distill option 'distill_layers' = \[5, 2\]"):
        DistillConfig(output_dir="unused", bf16=False, distill_layers=[5, 2])
