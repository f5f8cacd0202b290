"""The monitor's fixed probe set: harmful prompts (unsafe rate), benign borderline prompts
(over-refusal) and optional task prompts with reference answers (task score)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..eval.prompts import BUILTIN_SETS, PromptItem, PromptSet, load_prompts, split_prompts

__all__ = ["ProbeSet", "as_probe_items", "load_probes"]


@dataclass(frozen=True)
class ProbeSet:
    """The prompts every probe run generates on, in a fixed order (the paired test relies on it)."""

    harmful: tuple[PromptItem, ...]
    benign: tuple[PromptItem, ...] = ()
    task: tuple[PromptItem, ...] = ()

    def __len__(self) -> int:
        return len(self.harmful) + len(self.benign) + len(self.task)

    def describe(self) -> dict[str, int]:
        return {"harmful": len(self.harmful), "benign": len(self.benign), "task": len(self.task)}


def as_probe_items(source: Any, what: str, *, needs_reference: bool = False, data_dir: str | None = None,
                   eval_side: bool = False, seed: int = 0) -> list[PromptItem]:
    """Prompt items from a built-in set name / file path, a :class:`PromptSet`, a list of strings,
    of ``(prompt, answer)`` pairs or of ``{"prompt": ..., "answer": ...}`` mappings."""
    if isinstance(source, PromptSet):
        items = list(source.items)
    elif isinstance(source, (str, os.PathLike)):
        ps = load_prompts(source, reference_column="answer" if needs_reference else None, data_dir=data_dir)
        if eval_side and str(source) in BUILTIN_SETS:  # a built-in set: its held-out half; a file: as given
            ps = split_prompts(ps, 0.5, seed)[1]
        items = list(ps.items)
    elif isinstance(source, Sequence):
        items = []
        for i, x in enumerate(source):
            if isinstance(x, PromptItem):
                items.append(x)
            elif isinstance(x, str):
                items.append(PromptItem(f"{what}-{i}", x))
            elif isinstance(x, Mapping) and "prompt" in x:
                ref = x.get("answer", x.get("reference"))
                items.append(PromptItem(f"{what}-{i}", str(x["prompt"]), None if ref is None else str(ref)))
            elif isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, str) for v in x):
                items.append(PromptItem(f"{what}-{i}", x[0], x[1]))
            else:
                raise ConfigError(f"{what} probe {i}: expected a string, a (prompt, answer) pair or a mapping with 'prompt', got {type(x).__name__}")
    else:
        raise ConfigError(f"{what} probes: expected a set name, a file, a PromptSet or a list, got {type(source).__name__}")
    if needs_reference and any(it.reference is None for it in items):
        raise ConfigError(f"{what} probes need a reference answer for every prompt")
    return items


def load_probes(harmful: Any, harmful_size: int, benign: Any, benign_size: int, task: Any, task_size: int | None,
                *, data_dir: str | None = None, seed: int = 0) -> ProbeSet:
    """The probe set of a :class:`~hf_safety_merge.monitor.SafetyMonitorConfig`: the first
    ``harmful_size`` prompts of a harmful file or list (of a built-in set: of its evaluation side,
    the seeded 50% split the evaluation suite holds out), the first ``benign_size`` benign prompts, the task
    prompts (all, or the first ``task_size``)."""
    h = as_probe_items(harmful, "harmful", data_dir=data_dir, eval_side=True, seed=seed)[:harmful_size]
    if len(h) == 0:
        raise ConfigError("the monitor needs at least one harmful probe prompt")
    b = as_probe_items(benign, "benign", data_dir=data_dir)[:benign_size] if benign is not None and benign_size else []
    t = as_probe_items(task, "task", needs_reference=True, data_dir=data_dir) if task is not None else []
    if task_size is not None:
        t = t[:task_size]
    return ProbeSet(tuple(h), tuple(b), tuple(t))
