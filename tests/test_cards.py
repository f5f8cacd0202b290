"""Model cards: one per method, built from the template and checked with huggingface_hub."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from test_hub import hub  # noqa: F401  (the local Hub double fixture)

from hf_safety_merge import SafetyMergeConfig, merge
from hf_safety_merge.cards import (
    PROJECT_URL,
    attach_evaluation,
    merged_model_card,
    validate_card_metadata,
)
from hf_safety_merge.vectors import SafetyVector

METHODS = {
    "enchtable": {"beta": 0.2},
    "task_arithmetic": {"beta": 0.5},
    "safe_lora": {"num_proj_layers": 3},
    "ties": {"density": 0.3},
    "dare": {"density": 0.4, "seed": 1},
}


@pytest.fixture(scope="module")
def vector(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cards") / "vector"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False)
    (llama_family["task"] / "README.md").write_text("---\nlicense: apache-2.0\n---\n# task\n")
    return out


def _merge(family: dict[str, Path], vector: Path, out: Path, method: str, **extra: object) -> ModelCard:
    """Merge, then build the card as a push would see it (push options set: they must not leak)."""
    cfg = SafetyMergeConfig(task_model=str(family["task"]), task_reference=str(family["aligned"]),
                            safety_vector=str(vector), method=method, parameters=dict(METHODS[method]),
                            output_dir=str(out), **extra)
    result = merge(cfg, progress=False)
    pushed = dataclasses.replace(cfg, push_to_hub="me/patched", private=True, create_pr=True)
    card = merged_model_card(pushed, result, task_display=str(family["task"]), vector=SafetyVector.from_pretrained(vector))
    card.save(out / "README.md")
    return ModelCard.load(out / "README.md")


def _meta(card: ModelCard) -> dict:
    return yaml.safe_load(card.content.split("---")[1])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_card_per_method(method: str, llama_family: dict[str, Path], vector: Path, tmp_path: Path) -> None:
    card = _merge(llama_family, vector, tmp_path / "out", method,
                  task_model_hub_id="me/task-finetune", vector_aligned_hub_id="org/aligned")
    assert validate_card_metadata(card) == []
    meta = _meta(card)
    assert meta["base_model"][0] == "me/task-finetune" and "org/aligned" in meta["base_model"]
    assert meta["base_model_relation"] == "merge" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # inherited from the task model's card
    text = card.text
    assert PROJECT_URL in text and "https://github.com/)" not in text
    assert "revision `None`" not in text and "None" not in text.split("## Merge configuration")[1].split("```")[1]
    published = yaml.safe_load(text.split("## Merge configuration")[1].split("```yaml")[1].split("```")[0])
    for leaked in ("output_dir", "private", "create_pr", "push_to_hub", "overwrite"):
        assert leaked not in published
    assert str(llama_family["task"]) not in text and str(tmp_path) not in text
    assert published["task_model"] == "me/task-finetune" and published["task_reference"] == "<local>"
    # every parameter, defaults included
    from hf_safety_merge.merge import get_method_class

    for f in dataclasses.fields(get_method_class(method).Params):
        assert f"| `{f.name}` |" in text
    assert "*default*" in text
    table = text.split("## Per-matrix weights")[1].split("## Intended use")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `model.")]
    assert rows, f"empty per-matrix table for {method}"
    if method == "enchtable":
        assert "| tensor | w | interference I | kept rank r |" in table
        assert "gamma" in text and "lam" in text and "backend" in text
    elif method == "safe_lora":
        assert "| tensor | cosine(C tau, tau) | projected |" in table
        assert all(r.rstrip(" |").endswith(("yes", "no")) for r in rows)
        assert "projected=" not in table
    else:
        assert "norm of Delta_s" in table


def test_attach_evaluation_before_after(llama_family: dict[str, Path], vector: Path, tmp_path: Path) -> None:
    from hf_safety_merge.eval.metrics import rate
    from hf_safety_merge.eval.report import EvalReport, ModelReport

    out = tmp_path / "out"
    _merge(llama_family, vector, out, "task_arithmetic")

    def rep(name: str, k: int) -> ModelReport:
        return ModelReport(model=name, judge={"name": "keyword"}, unsafe_rate=rate(k=k, n=50),
                           attack_success={"none": rate(k=k, n=50), "dan": rate(k=k + 3, n=50)},
                           over_refusal=rate(k=4, n=40), refusal_judge={"name": "keyword"},
                           datasets={"harmful": {"source": "advbench", "n": 50}})

    report = EvalReport([rep("patched", 2), rep("task", 30)])
    card = attach_evaluation(out, report, model="patched")
    text = ModelCard.load(out / "README.md").content
    assert "## Evaluation" in text and "before (`task`)" in text and "n=50" in text and "keyword" in text
    assert "60.0% [" in text and "4.0% [" in text and "attack success: dan" in text
    meta = _meta(card)
    names = [m["type"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert {"unsafe_rate", "attack_success_rate", "over_refusal_rate"} <= set(names)
    assert validate_card_metadata(card) == []
    # attaching again replaces the section
    attach_evaluation(out, report, model="patched")
    assert ModelCard.load(out / "README.md").content.count("## Evaluation") == 1


def test_hub_id_fields_are_typed() -> None:
    from hf_safety_merge.errors import ConfigError

    with pytest.raises(ConfigError, match="task_model_hub_id"):
        SafetyMergeConfig(task_model="./a", safety_vector="./v", task_model_hub_id="not a repo id")


def test_eval_update_card_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hf_safety_merge.cli import main
    from hf_safety_merge.testing.chat import tiny_chat_model, tiny_chat_tokenizer

    d = tmp_path / "tiny-chat"
    tiny_chat_model(0).save_pretrained(d)
    tiny_chat_tokenizer().save_pretrained(d)
    (d / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny\n\nSome text.\n")
    rc = main(["eval", "--model", str(d), "--model", str(d), "--name", "patched", "--name", "task",
               "--prompts", "advbench", "--limit", "3", "--benign-limit", "3", "--max-new-tokens", "3",
               "--out", str(tmp_path / "ev"), "--no-progress", "--no-plots", "--update-card"])
    assert rc == 0 and "updated" in capsys.readouterr().out
    card = ModelCard.load(d / "README.md")
    assert "## Evaluation" in card.text and "before (`task`)" in card.text and "Some text." in card.text
    assert card.data.license == "mit" and card.data.eval_results and validate_card_metadata(card) == []


@pytest.mark.usefixtures("hub")
def test_card_passes_the_hub_validation(llama_family: dict[str, Path], vector: Path, tmp_path: Path) -> None:
    """`validate_card(online=True)` asks the (local double of the) Hub's validate-yaml endpoint."""
    from hf_safety_merge.cards import validate_card

    card = _merge(llama_family, vector, tmp_path / "out", "enchtable", task_model_hub_id="me/task-finetune")
    validate_card(card, online=True)
    bad = ModelCard("---\nbase_model: ./local/path\nbase_model_relation: merge\n---\n# x\n")
    with pytest.raises(ValueError, match="base_model"):
        validate_card(bad, online=True)


@pytest.mark.parametrize("method", ["enchtable", "ties"])
def test_engine_card_is_huggingface_hubs_card(method: str, llama_family: dict[str, Path], vector: Path,
                                               tmp_path: Path) -> None:
    """The engine renders its README without `huggingface_hub.repocard` (start-up time): the text
    is byte for byte what `ModelCard.from_template` gives for the same data and template."""
    from huggingface_hub import EvalResult, ModelCardData

    from hf_safety_merge.cards import TEMPLATE_PATH, render_merged_model_card
    from hf_safety_merge.cards import model_card as mc

    cfg = SafetyMergeConfig(task_model=str(llama_family["task"]), task_reference=str(llama_family["aligned"]),
                            safety_vector=str(vector), method=method, parameters=dict(METHODS[method]),
                            output_dir=str(tmp_path / "out"))
    result = merge(cfg, progress=False)
    written = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    vec = SafetyVector.from_pretrained(vector)
    assert written == str(render_merged_model_card(cfg, result, task_display=str(llama_family["task"]), vector=vec))
    # the same data through huggingface_hub's own ModelCard.from_template
    captured: dict = {}
    real_render = mc._render

    def capture(data: ModelCardData, template_path: Path, **kwargs: object) -> str:
        captured.update(data=data, kwargs=kwargs)
        return real_render(data, template_path, **kwargs)

    mc._render = capture
    try:
        ev = [EvalResult(task_type="text-generation", dataset_type="advbench", dataset_name="AdvBench",
                         metric_type="unsafe_rate", metric_value=0.1)]
        ours = render_merged_model_card(cfg, result, task_display="t", vector=vec, eval_results=ev)
    finally:
        mc._render = real_render
    theirs = ModelCard.from_template(captured["data"], template_path=str(TEMPLATE_PATH), **captured["kwargs"])
    assert str(ours) == str(theirs) == str(ours.to_model_card())


def test_card_preparation_runs_in_the_background_and_a_sink_may_skip_it(llama_family: dict[str, Path], vector: Path,
                                                                       tmp_path: Path) -> None:
    """A merge starts the sink's `prepare` on a thread (this package's sink: jinja2,
    `huggingface_hub.repocard_data` and the compiled template, loaded while tensors are merged)
    and joins it before it returns; a sink without `prepare` gets none, and one whose `prepare`
    fails still writes its card (the failure is left to the card writing)."""
    import subprocess
    import sys
    import threading

    from hf_safety_merge.io import sink as sink_mod

    code = ("import sys; from hf_safety_merge.io.sink import prepare_in_background; "
            "before = 'jinja2' in sys.modules; t = prepare_in_background(); t.join(); "
            "from hf_safety_merge.cards import model_card as mc; "
            "print(before, 'jinja2' in sys.modules, 'huggingface_hub.repocard_data' in sys.modules, mc._template.cache_info().currsize)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True", "True", "1"]

    calls: list[str] = []
    real = sink_mod.card_sink()

    class NoPrepare:
        def merged_model_card(self, config, result, *, task_display, vector):  # type: ignore[no-untyped-def]
            calls.append("card")
            return real.merged_model_card(config, result, task_display=task_display, vector=vector)

        def safety_vector_card(self, cfg):  # type: ignore[no-untyped-def]
            return real.safety_vector_card(cfg)

    class FailingPrepare(NoPrepare):
        def prepare(self) -> None:
            calls.append(f"prepare on {threading.current_thread().name}")
            raise RuntimeError("no template here")

    cfg = SafetyMergeConfig(task_model=str(llama_family["task"]), task_reference=str(llama_family["aligned"]),
                            safety_vector=str(vector), method="task_arithmetic", parameters={"beta": 1.0})
    try:
        for i, sink in enumerate([NoPrepare(), FailingPrepare()]):
            sink_mod.register_card_sink(sink)
            t = sink_mod.prepare_in_background()
            assert (t is None) == (i == 0)
            if t is not None:
                t.join()
            calls.clear()
            merge(cfg, output_dir=tmp_path / f"out{i}", progress=False)
            assert calls == (["card"] if i == 0 else ["prepare on card-prepare", "card"])
            assert (tmp_path / f"out{i}" / "README.md").read_text(encoding="utf-8").startswith("---")
    finally:
        sink_mod.register_card_sink(real)
    assert not [t for t in threading.enumerate() if t.name == "card-prepare"]
