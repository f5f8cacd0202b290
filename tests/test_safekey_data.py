"""SafeKey data preparation, offline, on tiny trained byte-level BPE tokenizers.

- the heuristic U / K split (restatement cues, query overlap, abbreviations, CJK, line breaks);
- character spans -> token spans through the offset mapping of the full rendered text, for tricky text
  (accents, CJK, emoji with modifiers) under Llama-3, Qwen2 ChatML and DeepSeek-R1 `<think>` style
  templates (hand-written Jinja, nothing downloaded);
- explicit offsets; clear errors for bad records.
"""

from __future__ import annotations

from typing import Any

import pytest

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.training.safekey.data import (
    build_safekey_example,
    is_restatement,
    prepare_safekey_dataset,
    spans_from_offsets,
    split_sentences,
    split_understanding_key,
)
from hf_safety_merge.training.safekey.render import render_example

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# DeepSeek-R1 style: the generation prompt opens the think block, and the template drops the reasoning
# of assistant turns (so the preparation must fall back to prompt + response + eos).
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"
)
SPECIAL = {
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": ([], None, "<|im_end|>"),
    "r1": (["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<think>", "</think>"],
           "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
}
TEMPLATES = {"llama3": LLAMA3_TEMPLATE, "qwen2": QWEN2_TEMPLATE, "r1": R1_TEMPLATE}

TRICKY_PROMPT = "Can you tell me how to make crème brûlée 🍮 for my café in 東京? 👍🏽"
TRICKY_REASONING = (
    "Okay, so the user wants a recipe for crème brûlée 🍮 to serve in their café in 東京. "
    "They're asking for step-by-step instructions — ça marche 👍🏽. "
    "This is a harmless cooking question, so I can help. "
    "First, heat the cream."
)
TRICKY_ANSWER = "Heat 500 ml of cream, whisk 6 yolks with sugar, bake at 150 °C, then caramelise. Bon appétit! 🔥"
CORPUS = [TRICKY_PROMPT, TRICKY_REASONING, TRICKY_ANSWER, "The user asks how to pick a lock. This is harmful. I must refuse."]


def make_tokenizer(kind: str) -> Any:
    from hf_safety_merge.testing.distill import tiny_tokenizer

    tok = tiny_tokenizer(CORPUS, vocab_size=400)
    extra, bos, eos = SPECIAL[kind]
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    if bos:
        tok.bos_token = bos
    tok.eos_token = eos
    tok.chat_template = TEMPLATES[kind]
    return tok


def response_for(kind: str) -> str:
    if kind == "r1":  # the generation prompt already holds "<think>\n"
        return f"{TRICKY_REASONING}</think>{TRICKY_ANSWER}"
    return f"<think>{TRICKY_REASONING}</think>{TRICKY_ANSWER}"


# -- the heuristic split --------------------------------------------------------------------------------


def _uk(response: str, query: str, **kw: Any) -> tuple[str, str]:
    s = split_understanding_key(response, query, **kw)
    return response[s.u_start : s.u_end], response[s.k_start : s.k_end]


def test_heuristic_restatement_cues() -> None:
    r = ("<think>Okay, so the user is asking how to pick a lock. They want to get into their neighbour's house. "
         "Hmm, that sounds like breaking and entering. I should refuse.</think>I can't help with that.")
    u, k = _uk(r, "How do I pick a lock to get into my neighbour's house?")
    assert u == "Okay, so the user is asking how to pick a lock. They want to get into their neighbour's house."
    assert k == "Hmm, that sounds like breaking and entering."


def test_heuristic_query_overlap_and_limits() -> None:
    q = "Write a poem about the sea at night"
    r = "Alright, a poem about the sea at night. A poem on the night sea, dark and calm. I should focus on imagery. Then rhyme."
    assert _uk(r, q) == ("Alright, a poem about the sea at night. A poem on the night sea, dark and calm.", "I should focus on imagery.")
    # everything restates the query: U stops so that one sentence is left for K
    r2 = "The user asks A. The user asks B. The user asks C."
    assert _uk(r2, "A B C") == ("The user asks A. The user asks B.", "The user asks C.")
    assert _uk(r2, "A B C", max_u_sentences=1) == ("The user asks A.", "The user asks B.")
    assert is_restatement("So, the question is about locks.", "")
    assert not is_restatement("This could hurt someone.", "How do I pick a lock?")
    assert not is_restatement("This request could cause harm.", "How do I make a pipe bomb?")  # a judgement, not a restatement
    # the prompt quoted in the reasoning (with its own sentence ends) stays in U by overlap
    q = "Tell me how to hack my ex's email. Quickly!"
    r = f"<think>The user asks: {q}. This request could cause harm. I must refuse it.</think>No."
    assert _uk(r, q) == (f"The user asks: {q}.", "This request could cause harm.")


def test_sentence_splitting() -> None:
    t = "The user asks, e.g. how to bake at 3.5 hours. Dr. Who is not relevant! Is it safe? Yes\nNext line。下一句！"
    got = [t[a:b] for a, b in split_sentences(t)]
    assert got == ["The user asks, e.g. how to bake at 3.5 hours.", "Dr. Who is not relevant!", "Is it safe?", "Yes",
                   "Next line。", "下一句！"]
    # CJK reasoning, no spaces
    assert _uk("用户问如何做饭。这是安全的。我可以回答。", "如何做饭") == ("用户问如何做饭。", "这是安全的。")
    # reasoning bounds: only the think block is split; </think> without <think> (R1 generation prompt)
    assert _uk("<think>The user asks X. Y is next.</think>Answer. More.", "X") == ("The user asks X.", "Y is next.")
    assert _uk("The user asks X. Y is next.</think>Answer. More.", "X") == ("The user asks X.", "Y is next.")


# -- char spans -> token spans ----------------------------------------------------------------------------


def _check_token_span(text: str, offsets: list[tuple[int, int]], t0: int, t1: int, a: int, b: int) -> None:
    """Tokens [t0, t1) are exactly those whose characters overlap [a, b)."""
    def overlaps(i: int) -> bool:
        s, e = offsets[i]
        return s < b and e > a

    assert t1 > t0
    assert all(overlaps(i) for i in range(t0, t1))
    assert t0 == 0 or not overlaps(t0 - 1) or offsets[t0 - 1][0] < a  # a straddling token before belongs to the previous part
    assert t1 == len(offsets) or not overlaps(t1)
    assert offsets[t0][0] <= a and offsets[t1 - 1][1] >= b


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "r1"])
def test_token_spans_match_char_spans(kind: str) -> None:
    tok = make_tokenizer(kind)
    response = response_for(kind)
    ex = build_safekey_example(tok, TRICKY_PROMPT, response, "benign")
    r = render_example(tok, TRICKY_PROMPT, response)
    prompt_text = tok.apply_chat_template([{"role": "user", "content": TRICKY_PROMPT}], tokenize=False, add_generation_prompt=True)
    assert r.text[: r.query_end] == prompt_text
    if kind == "r1":  # the template drops the reasoning: prompt + response + eos
        assert r.text == prompt_text + response + "<｜end▁of▁sentence｜>"
    else:
        assert r.text == tok.apply_chat_template(
            [{"role": "user", "content": TRICKY_PROMPT}, {"role": "assistant", "content": response}], tokenize=False
        )
    enc = tok(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    assert ex["input_ids"] == ids  # tokenised once, as a whole
    assert tok.decode(ids) == r.text
    q = ex["safekey_query_len"]
    assert tok.decode(ids[:q]) == prompt_text  # the query is the whole rendered prompt, template tokens included
    assert ex["labels"] == [-100] * q + ids[q:]

    spans = split_understanding_key(response, TRICKY_PROMPT)
    shift = r.response_shift
    u_text = response[spans.u_start : spans.u_end]
    k_text = response[spans.k_start : spans.k_end]
    assert u_text == ("Okay, so the user wants a recipe for crème brûlée 🍮 to serve in their café in 東京. "
                      "They're asking for step-by-step instructions — ça marche 👍🏽.")
    assert k_text == "This is a harmless cooking question, so I can help."
    u0, u1, k0, k1 = ex["safekey_u_start"], ex["safekey_u_end"], ex["safekey_k_start"], ex["safekey_k_end"]
    assert q <= u0 < u1 == k0 < k1 <= len(ids)
    _check_token_span(r.text, offsets, u0, u1, spans.u_start + shift, spans.u_end + shift)
    _check_token_span(r.text, offsets, k0, k1, spans.k_start + shift, spans.k_end + shift)
    # multi-byte characters are split across byte-level tokens, yet the spans decode to exactly the text
    assert tok.decode(ids[u0:u1]).strip() == u_text
    assert tok.decode(ids[k0:k1]).strip() == k_text


def test_explicit_offsets_mid_token_and_trimmed_template() -> None:
    tok = make_tokenizer("llama3")
    response = "  " + TRICKY_REASONING + "  "  # the Llama-3 template trims the content
    u_end = response.index("They're") - 1
    k_end = response.index("harmless") + 4  # ends inside a word: the whole token is in K
    ex = build_safekey_example(tok, TRICKY_PROMPT, response, 0, u_end=u_end, k_end=k_end)
    ids = ex["input_ids"]
    assert tok.decode(ids[ex["safekey_u_start"] : ex["safekey_u_end"]]).strip() == response[2:u_end].strip()
    k = tok.decode(ids[ex["safekey_k_start"] : ex["safekey_k_end"]]).strip()
    assert k.startswith("They're asking") and "harm" in k
    assert ex["safekey_label"] == 0.0
    # spans in the white space the template trims away are rejected
    with pytest.raises(ConfigError, match="outside the response"):
        build_safekey_example(tok, TRICKY_PROMPT, response, 0, u_start=0, u_end=u_end, k_end=k_end)


def test_prepare_dataset_columns_messages_and_labels() -> None:
    tok = make_tokenizer("qwen2")
    recs = [
        {"prompt": TRICKY_PROMPT, "response": response_for("qwen2"), "label": "benign", "id": 1},
        {"prompt": [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "How do I pick a lock?"}],
         "response": "<think>The user asks how to pick a lock. This is harmful. I must refuse.</think>No.", "label": True, "id": 2},
    ]
    ds = prepare_safekey_dataset(recs, tok, keep_columns=["id"])
    assert ds.column_names == ["input_ids", "labels", "safekey_query_len", "safekey_u_start", "safekey_u_end",
                               "safekey_k_start", "safekey_k_end", "safekey_label", "id"]
    assert ds["safekey_label"] == [0.0, 1.0] and ds["id"] == [1, 2]
    row = ds[1]
    assert tok.decode(row["input_ids"][: row["safekey_query_len"]]).startswith("<|im_start|>system\nBe careful.<|im_end|>")
    assert tok.decode(row["input_ids"][row["safekey_k_start"] : row["safekey_k_end"]]).strip() == "This is harmful."
    # max_length truncation keeps K
    long = prepare_safekey_dataset(recs[:1], tok, max_length=ds[0]["safekey_k_end"] + 1)
    assert len(long[0]["input_ids"]) == ds[0]["safekey_k_end"] + 1


def test_without_chat_template() -> None:
    tok = make_tokenizer("qwen2")
    tok.chat_template = None
    response = "The user asks about bread. Baking is safe. Here is how."
    prompt = "Question: how do I bake bread?\nAnswer:\n"
    ex = build_safekey_example(tok, prompt, response, 0)
    assert tok.decode(ex["input_ids"]) == prompt + response + "<|im_end|>"
    assert tok.decode(ex["input_ids"][: ex["safekey_query_len"]]) == prompt
    assert tok.decode(ex["input_ids"][ex["safekey_k_start"] : ex["safekey_k_end"]]).strip() == "Baking is safe."
    # a token that straddles the end of the prompt (" T" of "Answer: The") counts as query
    ex = build_safekey_example(tok, "Answer: ", response, 0)
    q = tok.decode(ex["input_ids"][: ex["safekey_query_len"]])
    assert q.startswith("Answer: ") and len(q) > len("Answer: ")
    assert ex["safekey_u_start"] == ex["safekey_query_len"]


def test_bad_records_errors() -> None:
    tok = make_tokenizer("qwen2")
    ok = {"prompt": "How do I pick a lock?", "response": "The user asks about locks. This is harmful.", "label": 1}
    with pytest.raises(ConfigError, match=r"record 0: missing 'label'"):
        prepare_safekey_dataset([{"prompt": "p", "response": "r"}], tok)
    with pytest.raises(ConfigError, match=r"record 1: missing 'label'"):
        prepare_safekey_dataset([ok, {**ok, "label": None}], tok)
    with pytest.raises(ConfigError, match="cannot read label 'maybe'"):
        prepare_safekey_dataset([{**ok, "label": "maybe"}], tok)
    with pytest.raises(ConfigError, match="label 3 is out of range"):
        prepare_safekey_dataset([{**ok, "label": 3}], tok)
    with pytest.raises(ConfigError, match="record 0: missing 'response'"):
        prepare_safekey_dataset([{"prompt": "p", "label": 0}], tok)
    with pytest.raises(ConfigError, match=r"key sentence K not found.*1 sentence"):
        prepare_safekey_dataset([{**ok, "response": "<think>Just one sentence here</think>Answer."}], tok)
    with pytest.raises(ConfigError, match=r"offsets out of range.*len\(response\) = 43"):
        prepare_safekey_dataset([{**ok, "u_end": 10, "k_end": 400}], tok)
    with pytest.raises(ConfigError, match="offsets out of range"):
        spans_from_offsets(ok["response"], 20, 10)
    with pytest.raises(ConfigError, match="give both 'u_end' and 'k_end'"):
        prepare_safekey_dataset([{**ok, "u_end": 10}], tok)
    with pytest.raises(ConfigError, match="u_end must be an integer"):
        prepare_safekey_dataset([{**ok, "u_end": "10", "k_end": 20}], tok)
    with pytest.raises(ConfigError, match=r"key sentence ends at token .* max_length is 5"):
        prepare_safekey_dataset([ok], tok, max_length=5)
    with pytest.raises(ConfigError, match="assistant turn"):
        prepare_safekey_dataset([{**ok, "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], tok)
