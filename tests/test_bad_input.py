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
from hf_safety_merge.testing import make_family, make_tiny_model, save


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
