"""SafeKey's heuristic split of a reasoning response into the query-understanding segment U and
the key sentence K, used when a record has no explicit offsets (`u_end`/`k_end`).

See :func:`split_understanding_key`:

- the reasoning is the text between `<think>` and `</think>` when the response has them (after
  `<think>` if there is no `</think>`; before `</think>` if there is no `<think>`, as with
  DeepSeek-R1 templates whose generation prompt opens the think block), else the whole response;
- it is split into sentences at `.`, `!`, `?`, `…` followed by white space (common abbreviations
  such as "e.g." and "Dr." excepted), at `。！？`, and at line breaks;
- U is the first sentence, extended by each following sentence that restates the query and is not
  a judgement (:func:`is_judgement`: a safety, legality or intent word the query does not hold,
  speculation about the user's intent, a refusal). A restatement opens (after an interjection such
  as "Okay," or "So,") with "the user" / "they" and a reporting verb ("the user is asking", "they
  want") or another restatement cue ("the question is about", "I need to figure out", ...; see
  `RESTATEMENT_CUES`), or at least `overlap_threshold` of its content words (3+ letters, not stop
  words) occur in the query; at most `max_u_sentences` sentences, and always leaving one sentence
  for K;
- K is the sentence right after U.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import ConfigError


@dataclass(frozen=True)
class CharSpans:
    """Character spans of U and K, in the coordinates of the text they were found in."""

    u_start: int
    u_end: int
    k_start: int
    k_end: int


_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "fig", "approx", "st", "no", "cf", "al"}

_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)|[。！？]+[\"'”’)\]」』]*|\n")

_INTERJECTION = re.compile(r"^(?:(?:okay|ok|alright|all right|so|well|hmm+|um+|right|now|first)[\s,.!:;—-]*)+", re.I)

#: Who the reasoning talks about when it restates the query ("The user ...", "They ...").
_SUBJECT = r"(?:the user|the person|this person|the requester|they|he|she)"

#: Verbs that report what that subject asks, wants or says: "The user is asking ...", "They want ...".
_REPORT_VERB = (
    r"(?:ask|asks|asking|asked|want|wants|wanting|wanted|request|requests|requesting|requested|need|needs|needing|"
    r"needed|would like|'d like|like to know|looking for|is looking|seek|seeks|seeking|wonder|wonders|wondering|"
    r"inquir\w*|enquir\w*|mention\w*|say|says|saying|said|write|writes|wrote|writing|provide\w*|share\w*|"
    r"describe\w*|curious|interested|trying to (?:understand|learn|find out|figure out)|plan to|plans to|planning to)"
)

_SUBJECT_REPORT = re.compile(
    rf"^{_SUBJECT}(?:'re|'s|'d|'ve| is| are| was| were| has| have| had| seems to be| appears to be)?"
    rf"(?:\s+(?:also|now|just|specifically|basically|essentially|really|actually|clearly|probably|here))?\s+{_REPORT_VERB}\b"
)

RESTATEMENT_CUES = (
    # Phrases that open a restatement of the query. "The user" / "they" count only when a reporting
    # verb follows ("The user is asking ...", "They want ..."; see `_SUBJECT_REPORT`): "The user might
    # be planning to hurt someone." is a judgement about the user, i.e. a candidate key sentence. So
    # are sentences that merely name "the request" or "this question" ("This request could cause harm.").
    "the question is about",
    "the question asks",
    "the question is asking",
    "the request is for",
    "the request is about",
    "the request asks",
    "the request is asking",
    "the query asks",
    "the query is about",
    "the prompt asks",
    "the prompt is asking",
    "the task is to",
    "this question asks",
    "this question is about",
    "this is asking",
    "i'm being asked",
    "i am being asked",
    "i've been asked",
    "i have been asked",
    "i'm asked",
    "i need to figure out",
    "i need to understand",
    "i have to figure out",
    "i'm trying to figure out",
    "let me understand",
    "let me restate",
    "let me make sure i understand",
    "in other words",
    "the goal is",
)


#: Words that judge the request or the user (safety, legality, intent, refusal). A sentence with one
#: of them that the query does not itself contain is a judgement, never a restatement: it can be K,
#: never U, whatever its cue or overlap with the query.
JUDGEMENT_WORDS = frozenset({
    "harm", "harms", "harmful", "harmless", "harming", "dangerous", "danger", "dangers", "illegal", "illegally",
    "unlawful", "legal", "legality", "unethical", "ethical", "ethics", "unsafe", "safe", "safety", "malicious",
    "risky", "risk", "risks", "suspicious", "refuse", "refusal", "decline", "inappropriate", "appropriate",
    "violate", "violates", "violation", "policy", "policies", "guidelines", "legitimate", "benign", "innocent",
    "intent", "intention", "intentions", "motive", "motives", "nefarious", "criminal", "crime", "fraud", "fraudulent", "scam", "abuse", "misuse",
    "exploit", "concerning", "alarming", "problematic", "prohibited", "forbidden", "allowed", "permissible",
})


#: Speculation about the user's intent ("might be planning", "could be trying"): a judgement.
_SPECULATION = re.compile(
    r"\b(?:might|may|could|probably|possibly|likely|perhaps|maybe)\s+(?:be\s+|have\s+|want\s+to\s+)?"
    r"(?:planning|plotting|trying|intending|attempting|aiming|hoping|scheming|looking to|seeking to|going to|up to|"
    r"use|misuse|exploit|hurt|harm|target)\b"
)

_REFUSAL = re.compile(r"\b(?:i|we)\s+(?:can't|cannot|can not|won't|will not|shouldn't|should not|must not|mustn't|must|should|need to|have to)\s+(?:refuse|decline|not\b|avoid|be careful)")

_STOP = {
    "the", "and", "for", "are", "but", "not", "you", "your", "all", "any", "can", "her", "was", "one", "our", "out",
    "his", "has", "had", "how", "its", "let", "may", "who", "did", "get", "use", "way", "she", "him", "they", "them",
    "their", "this", "that", "with", "what", "when", "where", "which", "while", "will", "would", "could", "should",
    "about", "from", "have", "into", "just", "like", "make", "more", "some", "such", "than", "then", "there", "these",
    "those", "want", "wants", "asking", "asks", "asked", "user", "okay", "need", "know", "does", "doing", "being",
    "been", "were", "here", "also", "very", "much", "many", "each", "other", "only", "over", "well", "think", "sure",
}

def reasoning_bounds(response: str) -> tuple[int, int]:
    """`(start, end)` of the reasoning segment of a response (see the module docstring)."""
    open_tag, close_tag = "<think>", "</think>"
    o = response.find(open_tag)
    c = response.find(close_tag, o + len(open_tag) if o >= 0 else 0)
    start = o + len(open_tag) if o >= 0 else 0
    end = c if c >= 0 else len(response)
    return start, end


def split_sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Sentences of `text[start:end]` as `(start, end)` character spans of `text`, white space trimmed."""
    end = len(text) if end is None else end
    spans: list[tuple[int, int]] = []
    s = start
    for m in _SENTENCE_END.finditer(text, start, end):
        if m.group() == "." and _is_abbreviation(text, s, m.start()):
            continue
        e = m.end()
        _append_trimmed(text, s, e, spans)
        s = e
    _append_trimmed(text, s, end, spans)
    return spans


def _is_abbreviation(text: str, sent_start: int, dot: int) -> bool:
    w = re.search(r"([A-Za-z]+(?:\.[A-Za-z]+)*)$", text[sent_start:dot])
    return bool(w) and w.group(1).lower() in _ABBREVIATIONS  # type: ignore[union-attr]


def _append_trimmed(text: str, s: int, e: int, spans: list[tuple[int, int]]) -> None:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    if e > s:
        spans.append((s, e))


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) >= 3 and w not in _STOP and not w.isdigit()}


def is_judgement(sentence: str, query: str = "") -> bool:
    """Does `sentence` judge the request or the user (a safety, legality or intent word the query
    does not contain, speculation about the user's intent, or a refusal)? Such a sentence is never
    part of U."""
    body = _INTERJECTION.sub("", sentence.strip()).lower()
    words = set(re.findall(r"[a-z]+", body))
    if (words & JUDGEMENT_WORDS) - set(re.findall(r"[a-z]+", query.lower())):
        return True
    return bool(_SPECULATION.search(body) or _REFUSAL.search(body))


def is_restatement(sentence: str, query: str, overlap_threshold: float = 0.5) -> bool:
    """Does `sentence` restate the query? Not if it is a judgement (:func:`is_judgement`); else if it
    opens (after an interjection) with a restatement cue (`RESTATEMENT_CUES`, or "the user" / "they"
    followed by a reporting verb: "The user is asking ...", "They want ..."), or at least
    `overlap_threshold` of its content words occur in the query."""
    if is_judgement(sentence, query):
        return False
    body = _INTERJECTION.sub("", sentence.strip()).lower()
    if _SUBJECT_REPORT.match(body) or any(body.startswith(c) for c in RESTATEMENT_CUES):
        return True
    words = _content_words(sentence)
    if not words:
        return False
    return len(words & _content_words(query)) / len(words) >= overlap_threshold


def split_understanding_key(
    response: str,
    query: str = "",
    *,
    max_u_sentences: int = 4,
    overlap_threshold: float = 0.5,
    where: str = "",
) -> CharSpans:
    """Heuristic U / K character spans of a reasoning response (offsets into `response`).

    U = the first sentence of the reasoning plus the following sentences that restate `query`
    (at most `max_u_sentences`), K = the next sentence. Raises `ConfigError` when the reasoning has
    fewer than two sentences (no K).
    """
    at = f"{where}: " if where else ""
    start, end = reasoning_bounds(response)
    sents = split_sentences(response, start, end)
    if len(sents) < 2:
        raise ConfigError(
            f"{at}key sentence K not found: the reasoning {response[start:end][:80]!r} has "
            f"{len(sents)} sentence(s), and U and K need at least two; give explicit 'u_end'/'k_end' offsets"
        )
    n_u = 1
    while n_u < min(max_u_sentences, len(sents) - 1) and is_restatement(
        response[sents[n_u][0] : sents[n_u][1]], query, overlap_threshold
    ):
        n_u += 1
    return CharSpans(sents[0][0], sents[n_u - 1][1], sents[n_u][0], sents[n_u][1])
