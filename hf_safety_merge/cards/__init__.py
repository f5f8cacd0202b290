"""Model and vector cards (ModelCard / ModelCardData templates): the sink the merge engine and vectors write through.

Owns: the merged model's card (`model_card`), the safety vector's card (`vector_card`), metadata
checks against the Hub's rules (`checks`) and the evaluation section / `model-index`
(`evaluation`). Layer 5 (docs/architecture.md): may import `io`, `methods`, `merge`, `eval.report` and everything below them; nothing
below imports it: it registers itself as the :class:`~hf_safety_merge.io.sink.CardSink`.

A patched model's card carries, in its front matter, every input as `base_model` (task model,
task reference, LoRA adapter, and the two models the safety vector comes from) with
`base_model_relation: merge`, the task model's licence and `pipeline_tag: text-generation`; in
its body the resolved method parameters (every default that was applied), the merge summary,
the vector's provenance, the published configuration (no local paths, no push options) and a
per-matrix table whose columns fit the method. `attach_evaluation` adds evaluation results
(before/after, with n, interval and judge) to the body and as `model-index` to the metadata.
"""

from __future__ import annotations

from ..io.sink import register_card_sink
from .checks import validate_card, validate_card_metadata
from .evaluation import (
    EVAL_BEGIN,
    EVAL_END,
    add_eval_results,
    attach_evaluation,
    evaluation_markdown,
    update_card_from_eval,
)
from .model_card import (
    PROJECT_URL,
    TEMPLATE_PATH,
    RenderedCard,
    inherited_license,
    merge_base_models,
    merged_model_card,
    prepare_rendering,
    published_config,
    render_merged_model_card,
    resolved_parameters,
)
from .vector_card import safety_vector_card

__all__ = [
    "EVAL_BEGIN",
    "EVAL_END",
    "PROJECT_URL",
    "TEMPLATE_PATH",
    "RenderedCard",
    "add_eval_results",
    "attach_evaluation",
    "evaluation_markdown",
    "inherited_license",
    "merge_base_models",
    "merged_model_card",
    "published_config",
    "render_merged_model_card",
    "resolved_parameters",
    "safety_vector_card",
    "update_card_from_eval",
    "validate_card",
    "validate_card_metadata",
]


class _ModuleSink:
    """This package as a :class:`~hf_safety_merge.io.sink.CardSink`."""
    merged_model_card = staticmethod(render_merged_model_card)
    safety_vector_card = staticmethod(safety_vector_card)

    prepare = staticmethod(prepare_rendering)


register_card_sink(_ModuleSink())
