"""The Space's API surface without a server: named endpoints, typed knobs, the offline message and
the evaluation plot (the toy models come from the library cache, built once)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

gr = pytest.importorskip("gradio", reason="the Space needs gradio (pip install -e '.[space]')")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app() -> ModuleType:
    sys.path.insert(0, str(ROOT / "space"))
    try:
        spec = importlib.util.spec_from_file_location("hf_safety_merge_space_app_api", ROOT / "space" / "app.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(ROOT / "space"))
        sys.modules.pop("toy_models", None)


def test_named_endpoints_and_int_knob(app: ModuleType) -> None:
    from hf_safety_merge.assets import default_cache_dir
    from hf_safety_merge.demo.toy_models import VERSION

    demo = app.build_app(default_cache_dir() / f"toy-v{VERSION}")
    info = demo.get_api_info()
    assert set(info["named_endpoints"]) == {"/merge", "/calibrate", "/chat", "/evaluate", "/push", "/monitor_curve"}
    assert not info.get("unnamed_endpoints")
    types = {p["parameter_name"]: p["python_type"]["type"] for p in info["named_endpoints"]["/merge"]["parameters"]}
    assert types["num_proj_layers"] == "int" and types["beta"] == "float"


def test_offline_message(app: ModuleType) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    from hf_safety_merge.errors import CheckpointError

    try:
        try:
            raise LocalEntryNotFoundError("cannot find the requested files in the disk cache")
        except LocalEntryNotFoundError as inner:
            raise CheckpointError("org/model: files could not be read") from inner
    except CheckpointError as e:
        assert app._message(e).startswith("Offline / not cached:")
    assert app._message(ValueError("bad beta")) == "ValueError: bad beta"


def test_eval_plot_shows_over_refusal(app: ModuleType, tmp_path: Path) -> None:
    from PIL import Image

    from hf_safety_merge.eval.metrics import rate
    from hf_safety_merge.eval.report import ModelReport

    reps = [ModelReport(model=n, judge={"name": "keyword"}, unsafe_rate=rate(k=k, n=10), over_refusal=rate(k=o, n=8),
                        utility=rate(k=3, n=6), utility_metric="exact_match") for n, k, o in (("before", 9, 0), ("after", 1, 2))]
    png = app._eval_plot(reps, tmp_path / "p.png")
    with Image.open(png) as im:
        assert im.size[0] > 300
    # the legend names the three metrics
    src = (ROOT / "space" / "app.py").read_text()
    assert '"over-refusal ↓", "over_refusal"' in src


def test_calibrate_action_on_the_toy_models(app: ModuleType, toy_space_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Space's "Calibrate and patch": streams the curve, ends with the chosen point and a
    patched model in the session state whose card carries the calibration."""
    from hf_safety_merge.demo.toy_models import VERSION

    monkeypatch.setenv("HF_SAFETY_SPACE_DIR", str(toy_space_dir))
    toys = toy_space_dir / f"toy-v{VERSION}"
    knobs = app.method_knobs("enchtable")
    steps = list(app.run_calibrate(
        str(toys / "task"), str(toys / "aligned"), str(toys / "safety_vector"), "enchtable",
        knobs["beta"], knobs["gamma"], 5.0, 0.5, 1.0, 1.0, "number", 0.5, 10, "", 0.3, 1.0, None,
        progress=lambda *a, **k: None,
    ))
    assert len(steps) >= 3 and "| beta | unsafe |" in steps[1][0]
    md, state = steps[-1]
    assert md.startswith("### Calibrated `enchtable`") and "smallest probed value that meets max_unsafe within the constraints" in md
    card = (Path(state["patched"]) / "README.md").read_text()
    assert "## Calibration" in card and state["parameters"]["beta"] > 0
