"""mergekit-style configs (merge_method / base_model / models:) and mergekit's CLI spellings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from naive_reference import load_state

from hf_safety_merge import SafetyMergeConfig, merge
from hf_safety_merge.cli import main
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.merge.mergekit_config import mergekit_to_dict, parse_out_shard_size
from hf_safety_merge.vectors import SafetyVector


@pytest.fixture(scope="module")
def vec(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mk") / "vector"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False)
    return out


def _mk(fam: dict[str, Path], vec: Path, method: str, tp: dict, vp: dict, **extra: object) -> dict:
    return {"merge_method": method, "base_model": str(fam["aligned"]),
            "models": [{"model": str(fam["task"]), "parameters": tp}, {"model": str(vec), "parameters": vp}], **extra}


def test_mapping_of_the_shared_methods(llama_family: dict[str, Path], vec: Path) -> None:
    d = mergekit_to_dict(_mk(llama_family, vec, "ties", {"weight": 1.0, "density": 0.3},
                             {"weight": 0.7, "density": 0.3}, dtype="bf16"))
    assert d["method"] == "ties" and d["task_model"] == str(llama_family["task"]) and d["safety_vector"] == str(vec)
    assert d["task_reference"] == str(llama_family["aligned"]) and d["dtype"] == "bfloat16"
    assert d["parameters"] == {"task_weight": 1.0, "safety_weight": 0.7, "density": 0.3}
    d = mergekit_to_dict(_mk(llama_family, vec, "dare_ties", {}, {"weight": 0.5}, parameters={"density": 0.4}))
    assert d["method"] == "dare" and d["parameters"] == {"ties": True, "safety_weight": 0.5, "density": 0.4}
    d = mergekit_to_dict(_mk(llama_family, vec, "task_arithmetic", {"weight": 1.0}, {"weight": 0.25}))
    assert d["method"] == "task_arithmetic" and d["parameters"] == {"beta": 0.25}
    d = mergekit_to_dict({"merge_method": "enchtable", "base_model": "org/aligned@v2", "safety_vector": "org/vec",
                          "models": [{"model": "org/base+me/lora"}, {"model": "org/vec"}], "parameters": {"beta": 0.2}})
    assert (d["task_model"], d["task_adapter"], d["task_reference_revision"]) == ("org/base", "me/lora", "v2")
    assert d["parameters"] == {"beta": 0.2}


@pytest.mark.parametrize("bad, match", [
    ({"slices": []}, "slices"),
    ({"parameters": {"normalize": False}}, "normalize"),
    ({"merge_method": "slerp"}, "slerp"),
    ({"modles": []}, "models"),
])
def test_mergekit_errors_are_one_line(llama_family: dict[str, Path], vec: Path, bad: dict, match: str) -> None:
    d = {**_mk(llama_family, vec, "ties", {"density": 0.5}, {"density": 0.5}), **bad}
    with pytest.raises(ConfigError, match=match) as e:
        SafetyMergeConfig.from_dict(d, source="mk.yaml")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="density differs"):
        mergekit_to_dict(_mk(llama_family, vec, "ties", {"density": 0.5}, {"density": 0.3}))
    with pytest.raises(ConfigError, match="exactly one task model"):
        mergekit_to_dict({"merge_method": "ties", "models": [{"model": str(vec)}]})


def test_mergekit_config_merges_like_ours_via_the_cli(llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    import yaml

    y = tmp_path / "mk.yaml"
    y.write_text(yaml.safe_dump(_mk(llama_family, vec, "ties", {"weight": 1.0, "density": 0.5},
                                    {"weight": 0.8, "density": 0.5})))
    assert main(["merge", str(y), str(tmp_path / "mk-out"), "--out-shard-size", "200K", "--no-progress"]) == 0
    merge(SafetyMergeConfig(task_model=str(llama_family["task"]), task_reference=str(llama_family["aligned"]),
                            safety_vector=str(vec), method="ties",
                            parameters={"task_weight": 1.0, "safety_weight": 0.8, "density": 0.5},
                            output_dir=str(tmp_path / "ours")), progress=False)
    a, b = load_state(tmp_path / "mk-out"), load_state(tmp_path / "ours")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = json.loads((tmp_path / "mk-out" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1  # 200K = 200,000 bytes per shard, as in mergekit
    assert main(["merge", str(y), str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2


def test_mergekit_cli_spellings() -> None:
    from hf_safety_merge.cli import build_parser

    a = build_parser().parse_args(["merge", "c.yaml", "out", "--cuda", "--out-shard-size", "5B"])
    assert a.out_dir == "out" and a.cuda and a.max_shard_size == "5B"
    assert parse_out_shard_size("5B") == 5 * 10**9 and parse_out_shard_size("500M") == 500 * 10**6
    assert parse_out_shard_size("5GB") == "5GB"
