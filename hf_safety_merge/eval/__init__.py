"""Safety evaluation: prompt sets, batched resumable generation, judges, attacks, metrics with
95% Wilson intervals, reports (JSON, Markdown, PNG, model-card ``eval_results``).

Quick start::

    from hf_safety_merge.eval import evaluate_safety
    report = evaluate_safety("path/or/hub-id", attacks=["dan", "base64"], harmful_limit=100,
                             output_dir="eval_out")
    print(report.summary())

Layer 2 (docs/architecture.md): may import `errors`, `validation`, `testing` only (it evaluates any model and knows nothing of merging); its commands (`eval`, `judge`) are in `cli/`.
"""

from .attacks import (
    Attack,
    AttackedPrompt,
    TemplateAttack,
    available_attacks,
    get_attack,
    load_dan_preambles,
)
from .engine import EngineConfig, VLLMEngine
from .generation import GenerationRequest, GenerationSettings, Generator, load_model, render_prompt
from .judges import (
    HarmBenchJudge,
    Judge,
    KeywordRefusalJudge,
    LlamaGuard3Judge,
    MDJudge,
    Verdict,
    available_judges,
    get_judge,
)
from .metrics import Rate, exact_match, pass_at_1, rate, run_code_tests, wilson_interval
from .openai_backend import OpenAIBackend, OpenAIServer
from .prompts import PromptItem, PromptSet, load_prompts, split_prompts
from .report import EvalReport, ModelReport, eval_results
from .suite import SafetyEvalConfig, compare_models, evaluate_safety


def metric_path() -> str:
    """The folder of the ``evaluate`` metric module: ``evaluate.load(metric_path())``."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "unsafe_rate")


__all__ = [
    "Attack",
    "AttackedPrompt",
    "EngineConfig",
    "EvalReport",
    "GenerationRequest",
    "GenerationSettings",
    "Generator",
    "HarmBenchJudge",
    "Judge",
    "KeywordRefusalJudge",
    "LlamaGuard3Judge",
    "MDJudge",
    "ModelReport",
    "OpenAIBackend",
    "OpenAIServer",
    "PromptItem",
    "PromptSet",
    "Rate",
    "SafetyEvalConfig",
    "TemplateAttack",
    "VLLMEngine",
    "Verdict",
    "available_attacks",
    "available_judges",
    "compare_models",
    "eval_results",
    "evaluate_safety",
    "exact_match",
    "get_attack",
    "get_judge",
    "load_dan_preambles",
    "load_model",
    "load_prompts",
    "metric_path",
    "pass_at_1",
    "rate",
    "render_prompt",
    "run_code_tests",
    "split_prompts",
    "wilson_interval",
]
