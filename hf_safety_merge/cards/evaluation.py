"""The card's evaluation section and `model-index` from an `EvalReport` (before/after, n, intervals, judge)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checks import _check, validate_card_metadata

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from ..eval.metrics import Rate
    from ..eval.report import EvalReport, ModelReport

EVAL_BEGIN = "<!-- hf-safety-merge:evaluation -->"
EVAL_END = "<!-- /hf-safety-merge:evaluation -->"


def _cell(r: Rate | None) -> str:
    if r is None or r.n == 0:
        return "-"
    return f"{100 * r.value:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}], n={r.n}"


def evaluation_markdown(after: ModelReport, before: ModelReport | None = None) -> str:
    """The card's evaluation section: unsafe rate, attack success, over-refusal and utility of
    this model (and of `before`, e.g. the task model), each with n, 95% Wilson interval and judge."""
    judge = str(after.judge.get("name", "keyword"))
    refusal = str(after.refusal_judge.get("name", "keyword"))
    rows: list[tuple[str, Any, Any, str]] = [("unsafe rate", before.unsafe_rate if before else None, after.unsafe_rate, judge)]
    attacks = [a for a in after.attack_success if a != "none"]
    for a in attacks:
        rows.append((f"attack success: {a}", before.attack_success.get(a) if before else None, after.attack_success[a], judge))
    rows.append(("over-refusal (benign prompts)", before.over_refusal if before else None, after.over_refusal, refusal))
    if after.utility is not None or (before is not None and before.utility is not None):
        rows.append((f"utility ({after.utility_metric or '-'})", before.utility if before else None, after.utility, "reference answers"))
    head = ["metric", f"before (`{before.model}`)" if before else None, f"this model (`{after.model}`)", "judge"]
    cols = [h for h in head if h is not None]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for name, b, a, j in rows:
        cells = [name, *([_cell(b)] if before else []), _cell(a), j]
        lines.append("| " + " | ".join(cells) + " |")
    sets = ", ".join(f"{k}: {v.get('source', k)} (n={v.get('n')})" for k, v in after.datasets.items())
    return (f"{EVAL_BEGIN}\n## Evaluation\n\nRates with 95% Wilson intervals, measured by `hf-safety-merge eval`. "
            f"Lower is better except utility.\n\n" + "\n".join(lines) + "\n\n"
            + (f"Prompt sets: {sets}.\n" if sets else "") + f"{EVAL_END}\n")


def _pick(report: EvalReport | ModelReport, name: str | None) -> ModelReport:
    from ..eval.report import ModelReport

    if isinstance(report, ModelReport):
        return report
    if name is None:
        return report.models[0]
    for m in report.models:
        if m.model == name:
            return m
    raise ValueError(f"no model {name!r} in the evaluation report; it has {[m.model for m in report.models]}")


def attach_evaluation(
    model_dir_or_card: str | Path | ModelCard,
    report: EvalReport | ModelReport,
    *,
    model: str | None = None,
    baseline: str | ModelReport | None = None,
    model_name: str | None = None,
    save: bool = True,
) -> ModelCard:
    """Put an evaluation into a card: a "before / after" section in the body (replacing an
    earlier one) and `model-index` eval results in the metadata, so the Hub shows them.

    `report` is an `EvalReport` (several models; `model` names this one, default the first;
    `baseline` names the "before" model, default the other one when there are exactly two) or a
    single `ModelReport`. With a folder, its README.md is updated in place (`save`).
    """
    from huggingface_hub import ModelCard

    from ..eval.report import EvalReport, ModelReport, eval_results

    after = _pick(report, model)
    before: ModelReport | None
    if isinstance(baseline, ModelReport):
        before = baseline
    elif baseline is not None:
        before = _pick(report, baseline)
    elif isinstance(report, EvalReport) and len(report.models) == 2:
        before = next(m for m in report.models if m is not after)
    else:
        before = None
    if isinstance(model_dir_or_card, ModelCard):
        card, path = model_dir_or_card, None
    else:
        path = Path(model_dir_or_card) / "README.md"
        card = ModelCard.load(path) if path.is_file() else ModelCard("---\n---\n")
    section = evaluation_markdown(after, before)
    text = card.content
    if EVAL_BEGIN in text and EVAL_END in text:
        pre, rest = text.split(EVAL_BEGIN, 1)
        text = pre + section + rest.split(EVAL_END, 1)[1].lstrip("\n")
    elif "\n## Merge configuration" in text:
        text = text.replace("\n## Merge configuration", "\n" + section + "\n## Merge configuration", 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    new = ModelCard(text)
    data: Any = new.data
    data.eval_results = eval_results(after)
    data.model_name = model_name or getattr(data, "model_name", None) or (
        path.parent.resolve().name if path is not None else after.model)
    _check(new)
    if path is not None and save:
        new.save(path)
    return new


def add_eval_results(model_dir: str | Path, results: list[Any], model_name: str | None = None) -> ModelCard:
    """Attach evaluation results (`huggingface_hub.EvalResult`s, e.g. from
    `hf_safety_merge.eval.eval_results(report)`) to a model folder's card metadata, in place.
    `attach_evaluation` also writes the body section; prefer it when you have the report.

    The card's other metadata and text are kept; existing results are replaced. Returns the card.
    """
    from huggingface_hub import ModelCard

    path = Path(model_dir) / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard("---\n---\n")
    data: Any = card.data
    data.eval_results = list(results)
    data.model_name = model_name or getattr(data, "model_name", None) or Path(model_dir).name
    errors = validate_card_metadata(card)
    if errors:
        raise ValueError(f"{path}: card metadata would be invalid: {errors}")
    card.save(path)
    return card



def update_card_from_eval(model_dir: str | Path, report: EvalReport) -> str:
    """`hf-safety-merge eval --update-card`: the first model of `report` is `model_dir`, the
    second (if any) its "before". Returns a one-line summary; raises `ConfigError` for a Hub id."""
    from ..errors import ConfigError

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ConfigError(f"--update-card: {model_dir} is not a local model folder (download it, evaluate the folder, "
                          "then push it with `hf-safety-merge push`)")
    after = report.models[0]
    before = report.models[1].model if len(report.models) > 1 else None
    attach_evaluation(folder, report, model=after.model, baseline=before)
    return (f"updated {folder / 'README.md'}: evaluation section and model-index "
            f"({after.model}{', before: ' + before if before else ''})")
