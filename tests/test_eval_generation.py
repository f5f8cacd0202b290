"""Batched generation: chat template, left padding, streaming JSONL, resume."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.eval.generation import (
    GenerationRequest,
    GenerationSettings,
    Generator,
    TransformersBackend,
    read_jsonl,
    render_prompt,
)
from hf_safety_merge.testing.chat import tiny_chat_model, tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_chat_model(0)


def requests(n: int = 11) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"r{i}", "please answer " + "question " * (i % 4) + str(i), "Sure," if i % 3 == 0 else "")
        for i in range(n)
    ]


class CountingBackend(TransformersBackend):
    """Counts how many prompts were actually generated."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(model, tokenizer)
        self.generated = 0

    def generate_batch(self, texts: Sequence[str], config: GenerationSettings) -> list[tuple[str, int]]:
        self.generated += len(texts)
        return super().generate_batch(texts, config)


def test_render_prompt_chat_template_and_prefill(tok: Any) -> None:
    text = render_prompt(tok, "hi there", "Sure,", system_prompt="be nice")
    assert text == (
        "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n"
        "<|im_start|>assistant\nSure,"
    )


def test_render_prompt_without_template() -> None:
    t = tiny_chat_tokenizer()
    t.chat_template = None
    assert render_prompt(t, "hi", "Sure") == "User: hi\nAssistant: Sure"


def test_left_padding_and_rows(model: Any, tok: Any) -> None:
    gen = Generator(model, tok, GenerationSettings(max_new_tokens=5, batch_size=4), model_name="tiny")
    rows = gen.generate(requests(6), progress=False)
    assert tok.padding_side == "left"
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(6)]
    for r in rows:
        assert 0 <= r["n_new_tokens"] <= 5
        assert isinstance(r["response"], str)
        assert r["model"] == "tiny"
    # Greedy output does not depend on batching (left padding with an attention mask).
    single = Generator(model, tok, GenerationSettings(max_new_tokens=5, batch_size=1), model_name="tiny")
    rows1 = single.generate(requests(6), progress=False)
    assert [r["response"] for r in rows1] == [r["response"] for r in rows]


def test_resume_after_interrupt_gives_same_file_without_regenerating(model: Any, tok: Any, tmp_path: Path) -> None:
    cfg = GenerationSettings(max_new_tokens=6, batch_size=3)
    reqs = requests(11)

    full = tmp_path / "full.jsonl"
    Generator(model, tok, cfg, model_name="tiny").generate(reqs, full, progress=False)

    part = tmp_path / "part.jsonl"
    calls = {"n": 0}

    def crash(rows: list[dict[str, Any]]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        Generator(model, tok, cfg, model_name="tiny").generate(reqs, part, progress=False, on_batch=crash)
    finished = read_jsonl(part)
    assert len(finished) == 6  # two batches of 3 were written before the "kill"
    # A half-written line from the kill is dropped on resume.
    with part.open("a") as f:
        f.write('{"id": "r9", "resp')

    backend = CountingBackend(model, tok)
    gen = Generator(model, tok, cfg, model_name="tiny", backend=backend)
    rows = gen.generate(reqs, part, progress=False)
    assert backend.generated == len(reqs) - 6  # finished rows were not regenerated
    assert gen.last_stats["resumed_rows"] == 6
    assert part.read_bytes() == full.read_bytes()
    assert [r["id"] for r in rows] == [r.id for r in reqs]

    # A third run generates nothing.
    backend2 = CountingBackend(model, tok)
    Generator(model, tok, cfg, model_name="tiny", backend=backend2).generate(reqs, part, progress=False)
    assert backend2.generated == 0
    assert part.read_bytes() == full.read_bytes()


def test_resume_with_max_rows(model: Any, tok: Any, tmp_path: Path) -> None:
    cfg = GenerationSettings(max_new_tokens=4, batch_size=2)
    out = tmp_path / "g.jsonl"
    g = Generator(model, tok, cfg, model_name="tiny")
    rows = g.generate(requests(7), out, progress=False, max_rows=3)
    assert len(rows) == 4 and g.last_stats["new_rows"] == 4  # stops at a batch boundary
    g.generate(requests(7), out, progress=False)
    assert g.last_stats["new_rows"] == 3
    assert len(read_jsonl(out)) == 7


def test_stale_rows_are_detected(model: Any, tok: Any, tmp_path: Path) -> None:
    out = tmp_path / "g.jsonl"
    Generator(model, tok, GenerationSettings(max_new_tokens=3), model_name="tiny").generate(requests(3), out, progress=False)
    with pytest.raises(ConfigError, match="another model, prompt or generation settings"):
        Generator(model, tok, GenerationSettings(max_new_tokens=4), model_name="tiny").generate(requests(3), out, progress=False)


def test_corrupt_middle_line_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 2"):
        read_jsonl(p)


def test_truncated_complete_last_line_gets_newline(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}')
    assert [r["id"] for r in read_jsonl(p, repair=True)] == ["a", "b"]
    assert p.read_text().endswith("}\n")


def test_duplicate_ids_and_bad_config(model: Any, tok: Any) -> None:
    g = Generator(model, tok, GenerationSettings(max_new_tokens=2))
    with pytest.raises(ConfigError, match="duplicate"):
        g.generate([GenerationRequest("a", "x"), GenerationRequest("a", "y")], progress=False)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        Generator(model, tok, GenerationSettings(max_new_tokens=0))


def test_progress_bar_shows_throughput(model: Any, tok: Any, capsys: pytest.CaptureFixture[str]) -> None:
    Generator(model, tok, GenerationSettings(max_new_tokens=2, batch_size=2), model_name="tiny").generate(
        requests(3), progress=True, desc="bench"
    )
    err = capsys.readouterr().err
    assert "bench" in err and "tok_s=" in err


def test_meta_is_kept(model: Any, tok: Any) -> None:
    rows = Generator(model, tok, GenerationSettings(max_new_tokens=2)).generate(
        [GenerationRequest("a", "x", meta={"set": "harmful", "attack": "none"})], progress=False
    )
    assert rows[0]["set"] == "harmful" and rows[0]["attack"] == "none"
    json.dumps(rows)
