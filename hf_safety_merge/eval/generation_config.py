"""What to generate and how: `GenerationRequest` (one prompt, an optional assistant prefill) and
`GenerationSettings` (tokens, batching, sampling, prefix cache), shared by the generator
(`generation`) and its backends (`backends`, `openai_backend`).

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `assets`, `testing` and `io`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a unique ``id``, the user message, an optional assistant ``prefill``."""

    id: str
    prompt: str
    prefill: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class GenerationSettings:
    """How to generate.

    Attributes:
        max_new_tokens: tokens generated per response.
        batch_size: prompts per forward pass.
        do_sample: False = greedy (the default, reproducible).
        temperature, top_p: sampling settings (used only with ``do_sample``).
        system_prompt: an optional system message.
        sort_by_length: batch prompts of similar length together (less padding).
        backend: ``"transformers"``, ``"vllm"`` or ``"auto"`` (vLLM when installed and the model
            is a path).
        seed: torch seed set before sampling.
        max_batch_tokens: with it, a batch holds at most ``batch_size`` rows *and* at most this
            many tokens (rows x (longest prompt + ``max_new_tokens``)), so short prompts go in
            large batches and long ones (jailbreak preambles) in small ones. None: ``batch_size``
            rows always.
        prefix_cache_min_tokens: prompts that share an opening of at least this many tokens
            (e.g. one jailbreak preamble wrapped around many requests) have its key/value cache
            computed once per model and reused in every batch (transformers backend; 0: off).
            The result is the same computation up to floating-point rounding
            (benchmarks/bench_generation.py measures the speed-up and the agreement).
    """

    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    system_prompt: str | None = None
    sort_by_length: bool = True
    backend: str = "transformers"
    seed: int = 0
    prefix_cache_min_tokens: int = 64
    max_batch_tokens: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"GenerationSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"GenerationSettings.batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("transformers", "vllm", "auto"):
            raise ConfigError(f"GenerationSettings.backend must be transformers, vllm or auto, got {self.backend!r}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ConfigError(f"GenerationSettings.max_batch_tokens must be >= 1 or None, got {self.max_batch_tokens}")
        if self.prefix_cache_min_tokens < 0:
            raise ConfigError(f"GenerationSettings.prefix_cache_min_tokens must be >= 0, got {self.prefix_cache_min_tokens}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change a response (part of each row's key)."""
        fp: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "system": self.system_prompt}
        if self.do_sample:
            fp.update(temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        return fp
