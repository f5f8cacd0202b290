"""What a safety evaluation measures: `SafetyEvalConfig` (prompt sets and their sizes, attacks,
judge, generation and backend settings, utility metric), validated on construction and built
from keyword options with a did-you-mean for unknown ones.

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `assets`, `testing` and `io`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field

from ..errors import ConfigError, did_you_mean
from ..validation import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_known_keys,
    validate_dataclass,
)
from .generation_config import GenerationSettings
from .judges import DEFAULT_JUDGE

UTILITY_METRICS = ("exact_match", "number", "pass@1")


@dataclass
class SafetyEvalConfig:
    """What to measure.

    Attributes:
        harmful: harmful prompt source (built-in name, CSV/JSONL path, Hub id) or a PromptSet.
        harmful_column: its text column (default ``prompt``).
        harmful_eval_size: keep only the eval side of a seeded split (a fraction or a count),
            so the other side can be trained on; None = every row.
        split_seed: the split's seed.
        harmful_limit: at most this many harmful prompts (after the split).
        benign: benign prompts for over-refusal (default: the 250 XSTest safe prompts); None = skip.
        benign_eval_size: keep only the eval side of a seeded split of the benign set (a fraction
            or a count; e.g. 0.5 for the half that calibration never uses); None = every row.
        benign_limit: at most this many benign prompts.
        utility: a task set with a reference column; None = skip.
        utility_column, utility_reference_column: its prompt and reference columns.
        utility_metric: ``exact_match`` (normalised), ``number`` (last number), or ``pass@1``
            (reference = Python test code run in a sandboxed subprocess).
        utility_limit: at most this many utility prompts.
        attacks: attack names (see :func:`hf_safety_merge.eval.attacks.available_attacks`).
        judge: the harm judge: ``auto`` (default: ``learned`` where its SmolLM2 feature model is
            available, else ``keyword`` with one warning line), ``learned``, ``keyword``,
            ``llama_guard3``, ``harmbench``, ``md_judge``, ``wildguard``, ``qwen3guard`` (``name:path`` for weights).
            The unsafe rate counts only attempts: labels in the judge's ``unsafe_labels``
            (``compliance`` for the refusal judges; a ``non_answer`` or a partial refusal is
            not an attempt).
        refusal_judge: the judge of refusals on benign prompts (must have refusal labels; same
            default).
        max_new_tokens, batch_size, max_batch_tokens, system_prompt: generation settings (see
            :class:`~hf_safety_merge.eval.generation.GenerationSettings`).
        code_timeout: seconds per pass@1 test run.
        data_dir: where built-in prompt sets and DAN preambles are found.
        backend: ``transformers`` (in this process), ``openai`` (an OpenAI-compatible server at
            ``server.base_url``: vLLM, SGLang, TGI, llama.cpp; ``model`` then names the tokenizer
            and the report), ``vllm`` (a vLLM server this library starts from vLLM's own
            environment, ``engine``; models evaluated in turn reuse it, reloading weights) or
            ``auto`` (``vllm`` when a vLLM environment is found, else ``transformers``).
            docs/evaluation.md, "Serving engines".
        server: an :class:`~hf_safety_merge.eval.openai_backend.OpenAIServer` (``openai``).
        engine: an :class:`~hf_safety_merge.eval.engine.EngineConfig` (``vllm`` / ``auto``;
            None: its defaults).
    """

    harmful: Any = "advbench"
    harmful_column: str | None = None
    harmful_eval_size: Annotated[float, Field(gt=0, lt=1)] | PositiveInt | None = 0.5
    split_seed: NonNegativeInt = 0
    harmful_limit: PositiveInt | None = None
    benign: Any = "xstest_safe"
    benign_eval_size: Annotated[float, Field(gt=0, lt=1)] | PositiveInt | None = None
    benign_limit: PositiveInt | None = None
    utility: Any = None
    utility_column: str | None = None
    utility_reference_column: str = "answer"
    utility_metric: str = "exact_match"
    utility_limit: PositiveInt | None = None
    attacks: Sequence[str] = field(default_factory=tuple)
    judge: Any = DEFAULT_JUDGE
    refusal_judge: Any = DEFAULT_JUDGE
    max_new_tokens: PositiveInt = 64
    batch_size: PositiveInt = 16
    max_batch_tokens: PositiveInt | None = None
    system_prompt: str | None = None
    code_timeout: PositiveFloat = 10.0
    data_dir: str | None = None
    backend: Literal["transformers", "vllm", "openai", "auto"] = "transformers"
    server: Any = None
    engine: Any = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Types and ranges of every field (strict), then the utility metric and generation."""
        if isinstance(self.data_dir, os.PathLike):
            self.data_dir = os.fspath(self.data_dir)
        validate_dataclass(self, what="evaluation option")
        if self.utility_metric not in UTILITY_METRICS:
            raise ConfigError(
                f"SafetyEvalConfig.utility_metric must be one of {UTILITY_METRICS}, got {self.utility_metric!r}"
                + did_you_mean(self.utility_metric, UTILITY_METRICS)
            )
        GenerationSettings(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size).validate()
        from .engine import EngineConfig
        from .openai_backend import OpenAIServer

        if self.server is not None and not isinstance(self.server, OpenAIServer):
            raise ConfigError(f"evaluation option 'server' must be an OpenAIServer, got {type(self.server).__name__}")
        if self.engine is not None and not isinstance(self.engine, EngineConfig):
            raise ConfigError(f"evaluation option 'engine' must be an EngineConfig, got {type(self.engine).__name__}")
        if self.backend == "openai" and self.server is None:
            raise ConfigError("backend 'openai' needs a server: SafetyEvalConfig(server=OpenAIServer(base_url=...)) or --base-url")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SafetyEvalConfig:
        check_known_keys(kwargs, cls, "evaluation option")
        return cls(**kwargs)
