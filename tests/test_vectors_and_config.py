from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from naive_reference import load_state

from hf_safety_merge import ConfigError, SafetyMergeConfig, SafetyVector, TensorFilter
from hf_safety_merge.io.filters import layer_index


def test_tensor_filters() -> None:
    names = {
        "model.embed_tokens.weight": (10, 4),
        "model.layers.0.self_attn.q_proj.weight": (4, 4),
        "model.layers.0.mlp.up_proj.weight": (8, 4),
        "model.layers.0.input_layernorm.weight": (4,),
        "model.layers.3.self_attn.o_proj.weight": (4, 4),
        "model.layers.3.mlp.down_proj.weight": (4, 8),
        "lm_head.weight": (10, 4),
    }

    def sel(**kw) -> set[str]:  # type: ignore[no-untyped-def]
        f = TensorFilter(**kw)
        return {n for n, s in names.items() if f(n, s)}

    assert sel() == {n for n, s in names.items() if len(s) == 2}
    assert sel(scope="attention") == {"model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.o_proj.weight"}
    assert sel(scope="mlp", layers=(1, 4)) == {"model.layers.3.mlp.down_proj.weight"}
    assert sel(min_ndim=1, include=[r"layernorm"]) == {"model.layers.0.input_layernorm.weight"}
    assert sel(exclude=["embed", "lm_head"], scope="all") == sel(scope="attention+mlp")
    assert layer_index("transformer.h.12.attn.c_attn.weight") == 12
    with pytest.raises(ConfigError, match="did you mean 'mlp'"):
        TensorFilter(scope="mpl")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="start < end"):
        TensorFilter(layers=(4, 2))
    with pytest.raises(ConfigError, match="unknown tensor filter field 'scop'"):
        TensorFilter.from_dict({"scop": "mlp"})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vector_compute_save_load(llama_family: dict[str, Path], tmp_path: Path, dtype: str) -> None:
    tf = TensorFilter(scope="mlp", layers=(1, 3))
    v = SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], tmp_path / "v",
                             tensor_filter=tf, dtype=dtype, progress=False)
    a, h = load_state(llama_family["aligned"]), load_state(llama_family["harmful"])
    assert sorted(v.keys()) == sorted(k for k in a if ".mlp." in k and (".1." in k or ".2." in k))
    for k in v:
        expected = (a[k].float() - h[k].float()).to(getattr(torch, dtype))
        assert v[k].dtype == getattr(torch, dtype) and torch.equal(v[k], expected)
    cfg = json.loads((tmp_path / "v" / "safety_vector_config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["tensor_filter"]["layers"] == [1, 3]
    assert cfg["dtype"] == dtype and cfg["num_tensors"] == 6 and cfg["library_version"]
    assert cfg["norm"] == pytest.approx(sum(x**2 for x in cfg["tensor_norms"].values()) ** 0.5)
    card = ModelCard.load(tmp_path / "v" / "README.md")
    assert "safety-vector" in (card.data.tags or [])
    # round trip through save_pretrained, with a dtype change and sharding
    v.save_pretrained(tmp_path / "v2", dtype="float32", max_shard_size="100KB")
    v2 = SafetyVector.from_pretrained(tmp_path / "v2")
    assert (tmp_path / "v2" / "safety_vector.safetensors.index.json").is_file()
    assert set(v2.keys()) == set(v.keys())
    for k in v:
        assert torch.equal(v2[k], v[k].float())
    assert "SafetyVector(architecture='LlamaForCausalLM'" in repr(v2)


def test_vector_in_memory_and_from_tensors(llama_family: dict[str, Path], tmp_path: Path) -> None:
    v = SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], progress=False)
    assert len(v) == 30 and v.norm > 0
    v.save_pretrained(tmp_path / "saved")
    assert SafetyVector.from_pretrained(tmp_path / "saved").norm == pytest.approx(v.norm)
    t = SafetyVector.from_tensors({"a": torch.ones(2, 2)})
    assert t.norm == pytest.approx(2.0)


def test_not_a_vector_folder(llama_family: dict[str, Path]) -> None:
    from hf_safety_merge import CheckpointError

    with pytest.raises(CheckpointError, match=r"safety_vector_config\.json"):
        SafetyVector.from_pretrained(llama_family["task"])


def test_config_round_trips(tmp_path: Path) -> None:
    cfg = SafetyMergeConfig(task_model="org/task", safety_vector="org/vec", task_reference="org/aligned",
                            method="enchtable", parameters={"beta": 0.2, "lam": 100.0}, dtype="bfloat16")
    for name in ("c.yaml", "c.json"):
        cfg.save(tmp_path / name)
        assert SafetyMergeConfig.from_file(tmp_path / name) == cfg
    cfg.save_pretrained(tmp_path / "d")
    assert SafetyMergeConfig.from_pretrained(tmp_path / "d") == cfg
    assert "method: enchtable" in cfg.to_yaml()
    with pytest.raises(ConfigError, match="missing required key"):
        SafetyMergeConfig.from_dict({"task_model": "x"})
    with pytest.raises(ConfigError, match="'dtype' must be one of"):
        SafetyMergeConfig(task_model="a", safety_vector="b", dtype="fp8")
    with pytest.raises(ConfigError, match="max_shard_size"):
        SafetyMergeConfig(task_model="a", safety_vector="b", max_shard_size="huge")
    assert SafetyMergeConfig(task_model="a", safety_vector="b", task_adapter="c").reference == "a"


def test_card_metadata_checks() -> None:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hf_safety_merge.cards import validate_card_metadata

    ok = ModelCard(f"---\n{ModelCardData(base_model='org/m', base_model_relation='merge', tags=['safety']).to_yaml()}\n---\n# x")
    assert validate_card_metadata(ok) == []
    bad = ModelCard("---\nbase_model: ./local/path\nbase_model_relation: mixed\ntags: safety\n---\n# x")
    errs = validate_card_metadata(bad)
    assert any("base_model './local/path'" in e for e in errs) and any("mixed" in e for e in errs)
    er = EvalResult(task_type="text-generation", dataset_type="advbench", dataset_name="AdvBench", metric_type="unsafe_rate",
                    metric_value=0.02)
    with_eval = ModelCard(f"---\n{ModelCardData(model_name='m', eval_results=[er], base_model='org/m').to_yaml()}\n---\n")
    assert validate_card_metadata(with_eval) == []
