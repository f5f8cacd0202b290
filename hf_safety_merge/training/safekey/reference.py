"""Rows in the SafeKey reference's layout (`data/train/sft_mix_2k.json`: `question`, `response`,
`summary_end_idx`, `next_sentence_end_idx`, `source`): recognised, and turned into this
library's (prompt, response, label, offsets) records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import ConfigError

#: `source` value of the benign rows of the reference's data (SafeKey `train/sft.py`: `unsafe` is 0 for
#: `source == "4o_rewrite"`, 1 for every other source).
REFERENCE_BENIGN_SOURCE = "4o_rewrite"


def is_reference_record(rec: Mapping[str, Any]) -> bool:
    """Is `rec` in the reference's data layout (`summary_end_idx` / `next_sentence_end_idx` offsets,
    SafeKey `data/train/sft_mix_2k.json`) and without this library's own `u_end` / `k_end`?"""
    return (rec.get("summary_end_idx") is not None and rec.get("next_sentence_end_idx") is not None
            and rec.get("u_end") is None and rec.get("k_end") is None)


def reference_response(response: str, where: str = "example") -> str:
    """The reference's reformatted response, in whose characters its offsets are counted (SafeKey
    `train/sft.py`, `get_response` with `think_flag=1`): `\\/` unescaped to `/`, white space
    trimmed, the text between the first `<think>` and the next `</think>` (trimmed) as the thinking and
    what follows (trimmed) as the answer, rendered `<think>\\n{thinking}\\n</think>\\n\\n{answer}`. Text
    before `<think>` is dropped, as the reference's regular expression search does. Raises where the
    response has no `<think>...</think>` (the reference then falls back to an empty thinking and
    prints a warning; its offsets would then point into that fallback text)."""
    r = response.replace("\\/", "/").strip()
    o = r.find("<think>")
    c = r.find("</think>", o + len("<think>")) if o >= 0 else -1
    if o < 0 or c < 0:
        raise ConfigError(f"{where}: a reference-layout response needs <think>...</think>, got {response[:80]!r}")
    thinking = r[o + len("<think>") : c].strip()
    answer = r[c + len("</think>") :].strip()
    return f"<think>\n{thinking}\n</think>\n\n{answer}"


def from_reference_record(rec: Mapping[str, Any], *, prompt_key: str = "prompt", label_key: str = "label",
                          where: str = "example") -> dict[str, Any]:
    """A record in the reference's layout -> this library's (prompt, response, label, offsets).

    Reference fields (SafeKey `train/sft.py`, `data/train/sft_mix_2k.json`): `question`, `response`,
    `summary_end_idx`, `next_sentence_end_idx` (character offsets into :func:`reference_response`:
    U = `a[:summary_end_idx]`, K = `a[summary_end_idx:next_sentence_end_idx]`) and `source`. Here:
    `response` = the reformatted response, `u_start` = its first thinking character (after
    `<think>\\n`; the reference's U tokens also start right after the query, which ends with
    `<think>\\n` under the R1 template), `u_end = k_start = summary_end_idx`,
    `k_end = next_sentence_end_idx`; the prompt is `prompt_key` if present, else `question`; the label
    is `label_key` if present, else the reference's rule (benign iff `source == "4o_rewrite"`).
    """
    prompt = rec.get(prompt_key) if rec.get(prompt_key) is not None else rec.get("question")
    if prompt is None:
        raise ConfigError(f"{where}: a reference-layout record needs 'question' (or {prompt_key!r}), has {sorted(rec)}")
    if rec.get("response") is None:
        raise ConfigError(f"{where}: a reference-layout record needs 'response', has {sorted(rec)}")
    if rec.get(label_key) is not None:
        label = rec[label_key]
    elif rec.get("source") is not None:
        label = 0 if rec["source"] == REFERENCE_BENIGN_SOURCE else 1
    else:
        raise ConfigError(f"{where}: a reference-layout record needs 'source' (or {label_key!r}), has {sorted(rec)}")
    a = reference_response(str(rec["response"]), where)
    s_end, n_end = rec["summary_end_idx"], rec["next_sentence_end_idx"]
    return {"prompt": prompt, "response": a, "label": label, "u_start": len("<think>\n"), "u_end": s_end,
            "k_start": s_end, "k_end": n_end}
