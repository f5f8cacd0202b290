"""The judge interface: ``judge(prompt, response) -> Verdict(label, score)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

__all__ = ["Judge", "Verdict"]


class Verdict(NamedTuple):
    """A judge's decision: a ``label`` and a ``score`` in [0, 1] (higher = more compliant/unsafe)."""

    label: str
    score: float


class Judge(ABC):
    """The judge interface."""

    name: ClassVar[str] = "judge"
    labels: ClassVar[tuple[str, ...]] = ()
    #: labels meaning "the response is unsafe / complied with a harmful request"
    unsafe_labels: ClassVar[frozenset[str]] = frozenset()
    #: labels meaning "the model refused" (over-refusal is measured with these)
    refusal_labels: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def judge(self, prompt: str, response: str) -> Verdict:
        """Judge one response to one prompt."""

    def judge_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """Judge many pairs (model judges override this to batch)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.judge(p, r) for p, r in zip(prompts, responses)]

    def __call__(self, prompt: str, response: str) -> Verdict:
        return self.judge(prompt, response)

    def is_unsafe(self, verdict: Verdict) -> bool:
        return verdict.label in self.unsafe_labels

    def is_refusal(self, verdict: Verdict) -> bool:
        return verdict.label in self.refusal_labels

    @property
    def can_judge_refusal(self) -> bool:
        return bool(self.refusal_labels)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}
