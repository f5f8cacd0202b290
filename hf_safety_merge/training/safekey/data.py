"""SafeKey data preparation: render, tokenise once, and locate the query X, the query-understanding
segment U and the key sentence K of every example in token coordinates.

An input record is a (prompt, reasoning response, label) triple::

    {"prompt": "How do I ...?",                  # or a list of chat messages
     "response": "<think>The user asks how to ... This could hurt someone. ...</think>I can't help with that.",
     "label": 1,                                  # 1 / True / "harmful" / "unsafe"; 0 / False / "benign" / "safe"
     # optional: explicit character offsets into `response` (otherwise a heuristic finds U and K)
     "u_end": 42, "k_end": 71, "u_start": 7, "k_start": 43}

Rows in the reference's layout (SafeKey `data/train/sft_mix_2k.json`: `question`, `response`,
`summary_end_idx`, `next_sentence_end_idx`, `source`) are accepted too (:func:`from_reference_record`).

How an example is built:

1. **Render** (:mod:`.render`, whose docstring says how): the prompt and the conversation through the
   chat template, one think block, or `prompt + response + eos` without a template.
2. **Tokenise once.** The full text goes through the (fast) tokenizer once, with
   `return_offsets_mapping=True` and `add_special_tokens=False` (the template already holds any BOS);
   pieces are never re-tokenised, so the ids are exactly those the model trains on.
3. **Map characters to tokens.** A token belongs to a character span when their character ranges
   overlap. Query tokens are those that start before the end of the rendered prompt (a token that
   straddles the boundary counts as query); U is the tokens overlapping U's characters that are not
   query tokens; K is the tokens overlapping K's characters that are not U tokens.

The heuristic split (used when a record has no `u_end`/`k_end`) is in
:mod:`hf_safety_merge.training.safekey.segments` (:func:`split_understanding_key`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ...errors import ConfigError
from .reference import (  # noqa: F401  (re-exported: this module's public API)
    REFERENCE_BENIGN_SOURCE,
    from_reference_record,
    is_reference_record,
    reference_response,
)
from .render import THINK_OPEN, render_example
from .segments import (  # noqa: F401  (re-exported: the public API of this module)
    JUDGEMENT_WORDS,
    RESTATEMENT_CUES,
    CharSpans,
    is_judgement,
    is_restatement,
    reasoning_bounds,
    split_sentences,
    split_understanding_key,
)

logger = logging.getLogger(__name__)

#: Columns that `prepare_safekey_dataset` adds next to `input_ids` / `labels`.
SAFEKEY_COLUMNS = (
    "safekey_query_len",
    "safekey_u_start",
    "safekey_u_end",
    "safekey_k_start",
    "safekey_k_end",
    "safekey_label",
)

HARMFUL_LABELS = {"harmful", "unsafe", "1", "true", "yes", "jailbreak"}
BENIGN_LABELS = {"benign", "safe", "0", "false", "no", "harmless"}


# -- labels -------------------------------------------------------------------------------------------


def parse_label(value: Any, where: str = "") -> float:
    """Harmful -> 1.0, benign -> 0.0 (bools, 0/1, probabilities in [0, 1], or words)."""
    at = f"{where}: " if where else ""
    if value is None:
        raise ConfigError(f"{at}missing 'label' (expected 1/True/'harmful' for a harmful query, 0/False/'benign' otherwise)")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        if not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"{at}label {value!r} is out of range: expected 0 (benign) or 1 (harmful), or a probability in [0, 1]")
        return float(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in HARMFUL_LABELS:
            return 1.0
        if v in BENIGN_LABELS:
            return 0.0
    raise ConfigError(
        f"{at}cannot read label {value!r}: expected 1/True/'harmful'/'unsafe' or 0/False/'benign'/'safe'"
    )


# -- explicit U / K offsets (the heuristic split is in `segments`) -----------------------------------


def spans_from_offsets(response: str, u_end: Any, k_end: Any, u_start: Any = None, k_start: Any = None, where: str = "") -> CharSpans:
    """Explicit offsets (characters of `response`) -> validated `CharSpans`.

    `u_start` defaults to the start of the reasoning (first non-space character after `<think>`),
    `k_start` to the first non-space character at or after `u_end`.
    """
    at = f"{where}: " if where else ""
    n = len(response)

    def as_int(name: str, v: Any) -> int:
        if isinstance(v, bool) or (not isinstance(v, int) and not (isinstance(v, float) and v.is_integer())):
            raise ConfigError(f"{at}{name} must be an integer character offset into the response, got {v!r}")
        return int(v)

    ue, ke = as_int("u_end", u_end), as_int("k_end", k_end)
    if u_start is None:
        us = reasoning_bounds(response)[0]
        while us < n and response[us].isspace():
            us += 1
    else:
        us = as_int("u_start", u_start)
    if k_start is None:
        ks = ue
        while ks < n and response[ks].isspace():
            ks += 1
    else:
        ks = as_int("k_start", k_start)
    if not (0 <= us < ue <= ks < ke <= n):
        raise ConfigError(
            f"{at}offsets out of range: need 0 <= u_start < u_end <= k_start < k_end <= len(response) = {n}, "
            f"got u_start={us}, u_end={ue}, k_start={ks}, k_end={ke}"
        )
    return CharSpans(us, ue, ks, ke)


# -- tokenisation ------------------------------------------------------------------------------------


def _token_range(offsets: Sequence[tuple[int, int]], a: int, b: int) -> tuple[int, int]:
    """`[first, last + 1)` of the tokens whose characters overlap `[a, b)`; `(0, 0)` if none.

    Byte-level tokenizers give every byte piece of a multi-byte character that character's range, so
    a character's pieces all fall in the span; zero-width tokens count when they sit inside it."""
    first = last = -1
    for i, (s, e) in enumerate(offsets):
        if (s < b and e > a) if s != e else (a <= s < b):
            if first < 0:
                first = i
            last = i
        elif first >= 0 and s >= b:
            break
    return (first, last + 1) if first >= 0 else (0, 0)


def build_safekey_example(
    tokenizer: Any,
    prompt: Any,
    response: str,
    label: Any,
    *,
    u_end: Any = None,
    k_end: Any = None,
    u_start: Any = None,
    k_start: Any = None,
    max_length: int | None = None,
    max_u_sentences: int = 4,
    overlap_threshold: float = 0.5,
    use_chat_template: bool | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
    where: str = "example",
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """One training row: `input_ids`, `labels` (query tokens -100) and the SafeKey columns
    (`safekey_query_len`, `safekey_u_start`/`_u_end`, `safekey_k_start`/`_k_end` as token indices,
    `safekey_label` as 0.0/1.0).

    A response `<think>` that repeats the end of the rendered prompt is left out (see
    :func:`think_overlap`); that is logged as a warning, or appended to `notes` when given."""
    if not isinstance(response, str) or not response.strip():
        raise ConfigError(f"{where}: 'response' must be a non-empty string")
    y = parse_label(label, where)
    query_text = prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt if isinstance(m, Mapping))
    if (u_end is None) != (k_end is None):
        raise ConfigError(f"{where}: give both 'u_end' and 'k_end' (or neither, to use the heuristic split)")
    if u_end is not None:
        spans = spans_from_offsets(response, u_end, k_end, u_start, k_start, where)
    else:
        spans = split_understanding_key(
            response, query_text, max_u_sentences=max_u_sentences, overlap_threshold=overlap_threshold, where=where
        )
    r = render_example(
        tokenizer, prompt, response, use_chat_template=use_chat_template, chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs, system_prompt=system_prompt, where=where,
    )
    if r.dropped:
        note = (f"{where}: the rendered prompt already ends with {THINK_OPEN!r} and the response opens with it; "
                f"the response's {r.dropped!r} is left out so that the text holds one think block")
        if notes is None:
            logger.warning(note)
        else:
            notes.append(note)
    # characters of the response -> characters of the full text
    ua, ub, ka, kb = (c + r.response_shift for c in (spans.u_start, spans.u_end, spans.k_start, spans.k_end))
    if ua < r.response_start or kb > r.response_end:
        why = (f"the response's leading {r.dropped!r} is left out (the prompt ends with it)" if r.dropped and ua < r.response_start
               else "the template trims white space around it")
        raise ConfigError(
            f"{where}: the U/K spans ({spans}) fall outside the response as the chat template renders it "
            f"({why}); move them inside the rendered response"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("SafeKey data preparation needs a fast tokenizer (return_offsets_mapping=True)")
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    q_len = sum(1 for s, _e in offsets if s < r.query_end)
    if q_len == 0 or q_len >= len(ids):
        raise ConfigError(f"{where}: the rendered prompt covers {q_len} of {len(ids)} tokens; the query and the response must both be non-empty")
    u0, u1 = _token_range(offsets, ua, ub)
    u0 = max(u0, q_len)
    if u1 <= u0:
        raise ConfigError(f"{where}: U ({r.text[ua:ub]!r}) has no tokens after the query")
    k0, k1 = _token_range(offsets, ka, kb)
    k0 = max(k0, u1)
    if k1 <= k0:
        raise ConfigError(f"{where}: key sentence K ({r.text[ka:kb]!r}) not found among the tokens after U")
    if max_length is not None and len(ids) > max_length:
        if k1 > max_length:
            raise ConfigError(
                f"{where}: the key sentence ends at token {k1} but max_length is {max_length}; raise max_length "
                "or shorten the prompt"
            )
        ids = ids[:max_length]
    labels = [-100] * q_len + ids[q_len:]
    return {
        "input_ids": ids,
        "labels": labels,
        "safekey_query_len": q_len,
        "safekey_u_start": u0,
        "safekey_u_end": u1,
        "safekey_k_start": k0,
        "safekey_k_end": k1,
        "safekey_label": y,
    }


def prepare_safekey_dataset(
    records: Iterable[Mapping[str, Any]] | Any,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    prompt_key: str = "prompt",
    response_key: str = "response",
    label_key: str = "label",
    max_u_sentences: int = 4,
    overlap_threshold: float = 0.5,
    use_chat_template: bool | None = None,
    chat_template: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    system_prompt: str | None = None,
    keep_columns: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
) -> Any:
    """(prompt, reasoning response, label) records -> a `datasets.Dataset` ready for `SafeKeyTrainer`.

    `records` is a list of dicts or a `datasets.Dataset` with `prompt_key` (a string or a list of
    chat messages), `response_key` and `label_key` columns, and optionally `u_end`/`k_end`
    (+ `u_start`/`k_start`) character offsets into the response; rows without them are split with
    :func:`split_understanding_key`. Rows in the reference's layout (`question`, `response`,
    `summary_end_idx`, `next_sentence_end_idx`, `source`) are read with :func:`from_reference_record`.
    A response `<think>` that the rendered prompt already ends with is left out (one warning for the
    data set, see :func:`think_overlap`). Every error names the record (`record 3: ...`).
    Columns out: `input_ids`, `labels` and :data:`SAFEKEY_COLUMNS` (plus `keep_columns`).
    """
    from datasets import Dataset

    rows = []
    notes: list[str] = []
    for i, rec in enumerate(records):
        where = f"record {i}"
        if not isinstance(rec, Mapping):
            raise ConfigError(f"{where}: expected a mapping with {prompt_key!r}, {response_key!r}, {label_key!r}, got {type(rec).__name__}")
        if is_reference_record(rec):
            extra = {c: rec.get(c) for c in keep_columns}
            rec = {**from_reference_record(rec, prompt_key=prompt_key, label_key=label_key, where=where), **extra}
            rec = {**rec, prompt_key: rec["prompt"], response_key: rec["response"], label_key: rec["label"]}
        for key in (prompt_key, response_key, label_key):
            if key not in rec or (rec[key] is None and key != label_key):
                raise ConfigError(f"{where}: missing {key!r} (has {sorted(rec)})")
        row = build_safekey_example(
            tokenizer, rec[prompt_key], rec[response_key], rec[label_key],
            u_end=rec.get("u_end"), k_end=rec.get("k_end"), u_start=rec.get("u_start"), k_start=rec.get("k_start"),
            max_length=max_length, max_u_sentences=max_u_sentences, overlap_threshold=overlap_threshold,
            use_chat_template=use_chat_template, chat_template=chat_template, chat_template_kwargs=chat_template_kwargs,
            system_prompt=system_prompt, where=where, notes=notes,
        )
        for c in keep_columns:
            row[c] = rec.get(c)
        rows.append(row)
        if progress is not None:
            progress(i + 1)
    if not rows:
        raise ConfigError("prepare_safekey_dataset: no records")
    if notes:
        logger.warning(
            "SafeKey: in %d of %d records the response opens with %r, which the rendered prompt already ends with "
            "(a DeepSeek-R1-style generation prompt); it is left out so that the text holds one think block (first: %s)",
            len(notes), len(rows), THINK_OPEN, notes[0],
        )
    return Dataset.from_list(rows)


def check_safekey_columns(columns: Iterable[str] | None, name: str = "train") -> None:
    """Raise a clear `ConfigError` when a prepared data set lacks SafeKey columns."""
    if columns is None:
        return
    missing = [c for c in ("input_ids", "labels", *SAFEKEY_COLUMNS) if c not in set(columns)]
    if missing:
        raise ConfigError(
            f"the {name} data set lacks {missing}: pass (prompt, response, label) records, or build the columns "
            "with hf_safety_merge.training.safekey.prepare_safekey_dataset"
        )
