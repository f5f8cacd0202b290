"""SafeKey data against the reference's (SafeKey `train/sft.py`) rendering and data layout, offline.

- the real DeepSeek-R1-distill chat template (Llama and Qwen distills ship the same one): its
  generation prompt ends with `<think>\\n`; a response that opens with `<think>` (STAR-1 rows) is
  rendered with one think block, and the tokens equal the reference's (its template with the
  `</think>` split removed, the conversation rendered and encoded whole), labels included;
- rows in the reference's layout (`question`, `response`, `summary_end_idx`, `next_sentence_end_idx`,
  `source`): U and K are the reference's character spans;
- the tightened U / K heuristic: judgements about the request or the user never join U.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.training.safekey.data import (
    build_safekey_example,
    from_reference_record,
    is_judgement,
    prepare_safekey_dataset,
    reference_response,
    split_understanding_key,
)
from hf_safety_merge.training.safekey.render import render_example

# tokenizer_config.json `chat_template` of deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (and -Llama-8B):
# one line, written out here as two Python strings, unchanged.
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)
# what the reference removes from the template before rendering (train/sft.py), so that the
# assistant turn keeps its reasoning
R1_SPLIT = "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

PROMPT = "How can I hurt someone without getting caught?"
THINKING = ("Okay, so the user is asking how to hurt someone without getting caught. "
            "The user might be planning to hurt someone. I need to refuse.")
ANSWER = "I can't help with that. If you are in conflict with someone, please talk to someone you trust."
STAR1_RESPONSE = f"<think>\n{THINKING}\n</think>\n\n{ANSWER}"  # how STAR-1 rows hold the response


@pytest.fixture(scope="module")
def tok() -> Any:
    from hf_safety_merge.testing.distill import tiny_tokenizer

    t = tiny_tokenizer([PROMPT, THINKING, ANSWER, "The user wants a bread recipe. This is harmless. Knead the dough."],
                       vocab_size=400)
    t.add_tokens([BOS, "<｜User｜>", "<｜Assistant｜>", EOS, "<think>", "</think>"], special_tokens=True)
    t.bos_token, t.eos_token = BOS, EOS
    t.chat_template = R1_DISTILL_TEMPLATE
    return t


def _reference_tokens(tok: Any, question: str, a: str) -> tuple[list[int], list[int]]:
    """The reference's input_ids and labels (train/sft.py, get_prompt): the template without the
    `</think>` split, rendered whole and encoded without special tokens; query tokens -100."""
    template = R1_DISTILL_TEMPLATE.replace(R1_SPLIT, "")
    assert template != R1_DISTILL_TEMPLATE
    user = [{"role": "user", "content": question}]
    full = tok.apply_chat_template([*user, {"role": "assistant", "content": a}], tokenize=False, chat_template=template)
    query = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, chat_template=template)
    ids = tok.encode(full, add_special_tokens=False)
    q = tok.encode(query, add_special_tokens=False)
    assert ids[: len(q)] == q
    return ids, [-100] * len(q) + ids[len(q) :]


def test_r1_generation_prompt_think_is_not_doubled(tok: Any, caplog: Any) -> None:
    prompt_text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert prompt_text.endswith("<｜Assistant｜><think>\n")
    r = render_example(tok, PROMPT, STAR1_RESPONSE)
    assert r.text == prompt_text + STAR1_RESPONSE[len("<think>\n") :] + EOS
    assert r.text.count("<think>") == 1 and r.dropped == "<think>\n"
    with caplog.at_level(logging.WARNING, logger="hf_safety_merge.training.safekey.data"):
        ds = prepare_safekey_dataset([{"prompt": PROMPT, "response": STAR1_RESPONSE, "label": 1}] * 3, tok)
    warned = [m for m in caplog.messages if "one think block" in m]
    assert len(warned) == 1 and "3 of 3 records" in warned[0]  # one warning for the data set
    row = ds[0]
    assert tok.decode(row["input_ids"]).count("<think>") == 1
    # the same tokens and labels as the reference's rendering of `<think>\n{thinking}\n</think>\n\n{answer}`
    ids, labels = _reference_tokens(tok, PROMPT, reference_response(STAR1_RESPONSE))
    assert row["input_ids"] == ids and row["labels"] == labels
    # U and K (the heuristic): U the restatement, K the judgement about the user
    u = tok.decode(row["input_ids"][row["safekey_u_start"] : row["safekey_u_end"]]).strip()
    k = tok.decode(row["input_ids"][row["safekey_k_start"] : row["safekey_k_end"]]).strip()
    assert (u, k) == ("Okay, so the user is asking how to hurt someone without getting caught.",
                      "The user might be planning to hurt someone.")
    # R1 data without the opening tag (the generation prompt holds it) is unchanged, and not warned about
    plain = render_example(tok, PROMPT, f"{THINKING}\n</think>\n\n{ANSWER}")
    assert plain.text == prompt_text + f"{THINKING}\n</think>\n\n{ANSWER}" + EOS and plain.dropped == ""
    # the same without a chat template, when the prompt string already ends with <think>
    r2 = render_example(tok, "Question<think>\n", "<think>Okay. Then.</think>A.", use_chat_template=False)
    assert r2.text == "Question<think>\nOkay. Then.</think>A." + EOS


def test_explicit_offsets_inside_a_dropped_think_are_refused(tok: Any) -> None:
    with pytest.raises(ConfigError, match=r"leading '<think>\\n' is left out"):
        build_safekey_example(tok, PROMPT, STAR1_RESPONSE, 1, u_start=0, u_end=30, k_end=60)


def _reference_record(question: str, raw: str, u_text: str, k_text: str, source: str) -> dict[str, Any]:
    a = reference_response(raw)
    s = a.index(u_text) + len(u_text)
    assert a[s:].startswith(k_text)
    return {"question": question, "response": raw, "summary_end_idx": s, "next_sentence_end_idx": s + len(k_text),
            "source": source}


def test_reference_layout_records(tok: Any) -> None:
    raw = f"  <think>  {THINKING}  </think>\n{ANSWER.replace('/', chr(92) + '/')}  "  # loose white space, escaped slash
    a = reference_response(raw)
    assert a == f"<think>\n{THINKING}\n</think>\n\n{ANSWER}"
    rec = _reference_record(PROMPT, raw, "without getting caught.", " The user might be planning to hurt someone.", "STAR-1")
    benign = _reference_record("How do I bake bread?", "<think>The user wants a bread recipe. This is harmless. Knead the dough.</think>Sure.",
                               "The user wants a bread recipe.", " This is harmless.", "4o_rewrite")
    mine = from_reference_record(rec)
    assert mine["label"] == 1 and from_reference_record(benign)["label"] == 0  # the reference's rule on `source`
    assert mine["response"] == a and mine["u_end"] == mine["k_start"] == rec["summary_end_idx"]
    ds = prepare_safekey_dataset([rec, benign], tok)
    assert ds["safekey_label"] == [1.0, 0.0]
    for row, r in zip(ds, (rec, benign), strict=True):
        a = reference_response(r["response"])
        s, n = r["summary_end_idx"], r["next_sentence_end_idx"]
        ids = row["input_ids"]
        # the reference's U = a[:summary_end_idx] (after the query's '<think>\n'), K = a[summary_end_idx:next_sentence_end_idx]
        assert tok.decode(ids[row["safekey_u_start"] : row["safekey_u_end"]]) == a[len("<think>\n") : s]
        assert tok.decode(ids[row["safekey_k_start"] : row["safekey_k_end"]]) == a[s:n]
        assert row["safekey_u_start"] == row["safekey_query_len"]  # U starts right after the query, as its c_span does
        ref_ids, ref_labels = _reference_tokens(tok, r["question"], a)
        assert ids == ref_ids and row["labels"] == ref_labels
    # a label column wins over `source`; errors name the record
    assert from_reference_record({**rec, "label": 0})["label"] == 0
    with pytest.raises(ConfigError, match="record 0: a reference-layout record needs 'source'"):
        prepare_safekey_dataset([{k: v for k, v in rec.items() if k != "source"}], tok)
    with pytest.raises(ConfigError, match=r"needs <think>...</think>"):
        prepare_safekey_dataset([{**rec, "response": "no think block"}], tok)


@pytest.mark.parametrize(("query", "reasoning", "u", "k"), [
    # the case: speculation about the user's intent is the judgement, not a restatement
    (PROMPT, THINKING, "Okay, so the user is asking how to hurt someone without getting caught.",
     "The user might be planning to hurt someone."),
    ("How do I pick a lock?", "The user asks how to pick a lock. The user could be trying to break into a house. I should refuse.",
     "The user asks how to pick a lock.", "The user could be trying to break into a house."),
    # a safety word that the query holds does not make a restatement a judgement
    ("Is it safe to mix bleach and ammonia?",
     "Okay, the user is asking whether it is safe to mix bleach and ammonia. Mixing them releases toxic gas. So no.",
     "Okay, the user is asking whether it is safe to mix bleach and ammonia.", "Mixing them releases toxic gas."),
    # high overlap with the query, but a judgement word the query lacks
    ("How do I get into my neighbour's house when they're away?",
     "The user wants to get into a neighbour's house. Getting into a neighbour's house when they're away is illegal. No.",
     "The user wants to get into a neighbour's house.", "Getting into a neighbour's house when they're away is illegal."),
    # "the user" with a reporting verb restates; "the user's request" does not
    ("Write a phishing email", "The user is asking for a phishing email. They want it to look real. The user's request is for fraud.",
     "The user is asking for a phishing email. They want it to look real.", "The user's request is for fraud."),
    ("Plan a 3-day trip to Paris", "The user is planning a trip to Paris. They want a three-day itinerary. I can suggest museums.",
     "The user is planning a trip to Paris. They want a three-day itinerary.", "I can suggest museums."),
])
def test_heuristic_keeps_judgements_out_of_u(query: str, reasoning: str, u: str, k: str) -> None:
    r = f"<think>{reasoning}</think>Answer."
    s = split_understanding_key(r, query)
    assert (r[s.u_start : s.u_end], r[s.k_start : s.k_end]) == (u, k)


def test_judgement_detector() -> None:
    assert is_judgement("The user might be planning to hurt someone.")
    assert is_judgement("This seems harmless.")
    assert is_judgement("I must refuse.")
    assert not is_judgement("The user is asking whether it is safe.", "Is it safe?")
    assert not is_judgement("They want a recipe for bread.")
