"""A method class is the one place a method is described: a new method written in one file works
everywhere (the registry and its alias, `hf-safety-merge methods`, a merge and its card, calibration's
scale, mergekit configs, the Space's knobs), and nothing else needs an edit."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from naive_reference import load_state

from hf_safety_merge import SafetyMergeConfig, merge
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.merge.calibration_config import CalibrationConfig, scales
from hf_safety_merge.merge.mergekit_config import mergekit_to_dict
from hf_safety_merge.methods.base import available_methods, get_method_class, register, unregister
from hf_safety_merge.vectors import SafetyVector

ROOT = Path(__file__).resolve().parent.parent

#: the whole method: one file, nothing else edited
METHOD_FILE = '''
"""Half sum: theta = theta_task + weight / 2 * Delta_s (a test method)."""

import dataclasses
from typing import Annotated

import torch
from pydantic import Field

from hf_safety_merge.methods.base import Knob, MergeMethod, MethodParams, register


@dataclasses.dataclass
class HalfSumParams(MethodParams):
    """theta = theta_task + weight / 2 * Delta_s.

    Attributes:
        weight: twice the safety vector's share, in (0, 4].
    """

    weight: Annotated[float, Field(gt=0, le=4)] = 1.0


@register
class HalfSum(MergeMethod):
    name = "half_sum"
    aliases = ("halfsum",)
    Params = HalfSumParams
    needs_reference = False
    reference = "a method written for this test"
    card_text = "Half sum: `theta = theta_task + weight / 2 * Delta_s`."
    description = "**Half sum**: half of the safety vector, scaled."
    scale = ("weight", 0.1, 4.0)
    mergekit_names = {"half_sum": {}}
    mergekit_model_parameters = {"vector.weight": "weight"}
    knobs = {"weight": Knob("weight: twice the safety vector's share", 0.0, 4.0, 0.1)}
    toy_parameters = {"weight": 2.0}

    def merge_tensor(self, name, theta_task, tau, delta):
        return theta_task + (self.params.weight / 2) * delta
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    path = tmp_path_factory.mktemp("plugin") / "half_sum.py"
    path.write_text(METHOD_FILE)
    spec = importlib.util.spec_from_file_location("half_sum_plugin", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["half_sum_plugin"] = mod
    spec.loader.exec_module(mod)
    yield mod
    unregister("half_sum")
    sys.modules.pop("half_sum_plugin", None)


@pytest.fixture(scope="module")
def vec(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plugin-vec") / "vector"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False)
    return out


def test_registry_and_alias(plugin: ModuleType) -> None:
    assert "half_sum" in available_methods() and "halfsum" not in available_methods()
    assert get_method_class("halfsum") is plugin.HalfSum
    with pytest.raises(ConfigError, match="already taken"):
        register(type("Impostor", (plugin.HalfSum,), {"name": "enchtable"}))


def test_methods_command_describes_it(plugin: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_safety_merge.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "half_sum" in out and "twice the safety vector's share" in out and "aliases: halfsum" in out
    assert "a method written for this test" in out and "float in (0, 4] = 1.0" in out


def test_merge_and_card(plugin: ModuleType, llama_family: dict[str, Path], vec: Path, tmp_path: Path) -> None:
    cfg = SafetyMergeConfig(task_model=str(llama_family["task"]), safety_vector=str(vec), method="halfsum",
                            parameters={"weight": 3.0}, output_dir=str(tmp_path / "out"))
    assert cfg.method == "half_sum"  # an alias is stored under the method's name
    merge(cfg, progress=False)
    task, got = load_state(llama_family["task"]), load_state(tmp_path / "out")
    delta = SafetyVector.from_pretrained(vec)
    names = [n for n in delta if n in task]
    assert names
    for name in names:
        torch.testing.assert_close(got[name], task[name] + 1.5 * delta[name].float())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Half sum: `theta = theta_task + weight / 2 * Delta_s`." in card


def test_calibration_scale(plugin: ModuleType) -> None:
    assert scales()["half_sum"] == ("weight", 0.1, 4.0)
    assert CalibrationConfig().scale_for("halfsum") == ("weight", 0.1, 4.0, False)


def test_mergekit_config(plugin: ModuleType, llama_family: dict[str, Path], vec: Path) -> None:
    d = mergekit_to_dict({"merge_method": "half_sum", "models": [
        {"model": str(llama_family["task"])}, {"model": str(vec), "parameters": {"weight": 0.5}}]})
    assert d["method"] == "half_sum" and d["parameters"] == {"weight": 0.5}
    with pytest.raises(ConfigError, match="keeps the task model whole"):
        mergekit_to_dict({"merge_method": "half_sum", "models": [
            {"model": str(llama_family["task"]), "parameters": {"weight": 0.5}}, {"model": str(vec)}]})


def test_space_knobs(plugin: ModuleType) -> None:
    pytest.importorskip("gradio")
    spec = importlib.util.spec_from_file_location("hf_safety_merge_space_app_plugin", ROOT / "space" / "app.py")
    assert spec is not None and spec.loader is not None
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.knob_specs()["weight"].label == "weight: twice the safety vector's share"
    assert app.method_knobs("half_sum") == {"weight": 1.0}
    assert app.toy_knobs("half_sum") == {"weight": 2.0}
    assert app.method_info("half_sum") == "**Half sum**: half of the safety vector, scaled."
    json.dumps(app.toy_knobs("half_sum"))


def test_builtin_methods_describe_themselves() -> None:
    """Every built-in method has its card text, reference, description and scale, and its knobs and toy
    settings name its own parameters."""
    for name in available_methods():
        cls = get_method_class(name)
        assert cls.card_text and cls.reference and cls.description, name
        assert cls.scale is not None and cls.scale[0] in {f for f in cls.Params.__dataclass_fields__}, name
        assert set(cls.knobs) <= set(cls.Params.__dataclass_fields__), name
        assert set(cls.toy_parameters) <= set(cls.Params.__dataclass_fields__), name
    assert get_method_class("resta").name == "task_arithmetic"
