"""Model cards for patched models and safety vectors, built with `huggingface_hub.ModelCard` /
`ModelCardData` from a Jinja template (`templates/merged_model_card.md`).

A patched model's card carries, in its front matter, every input as `base_model` (task model,
task reference, LoRA adapter, and the two models the safety vector comes from) with
`base_model_relation: merge`, the task model's licence and `pipeline_tag: text-generation`; in
its body the resolved method parameters (every default that was applied), the merge summary,
the vector's provenance, the published configuration (no local paths, no push options) and a
per-matrix table whose columns fit the method. `attach_evaluation` adds evaluation results
(before/after, with n, interval and judge) to the body and as `model-index` to the metadata.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from .config import SafetyMergeConfig
    from .eval.metrics import Rate
    from .eval.report import EvalReport, ModelReport
    from .merge.engine import MergeResult
    from .vectors import SafetyVector, SafetyVectorConfig

#: where the library lives (setup.cfg `url`); cards link here
PROJECT_URL = "https://pypi.org/project/hf-safety-merge/"
TEMPLATE_PATH = Path(__file__).parent / "templates" / "merged_model_card.md"
EVAL_BEGIN = "<!-- hf-safety-merge:evaluation -->"
EVAL_END = "<!-- /hf-safety-merge:evaluation -->"
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

_METHOD_TEXT = {
    "enchtable": "EnchTable (arXiv 2511.09880): `theta = theta_task + w * alpha * Delta_s`, with the coarse "
    "scale `alpha = beta * ||tau|| / ||Delta_s||` and a per-matrix SVD interference weight `w = exp(-I)`.",
    "task_arithmetic": "Task arithmetic (RESTA): `theta = theta_task + beta * Delta_s`.",
    "safe_lora": "Safe LoRA projection: the fine-tuning update of the least aligned matrices is projected onto "
    "the alignment subspace `C = V V^T / ||V||_F`.",
    "ties": "TIES merging of the task update and the safety vector (peft.utils.merge_utils.ties).",
    "dare": "DARE merging of the task update and the safety vector (peft.utils.merge_utils).",
}
#: config fields never published in a card (local output, publishing options, card options)
_UNPUBLISHED = ("output_dir", "overwrite", "push_to_hub", "private", "create_pr", "commit_message", "license",
                "task_model_hub_id", "task_adapter_hub_id", "task_reference_hub_id", "safety_vector_hub_id",
                "vector_aligned_hub_id", "vector_reference_hub_id")
#: config fields that name an input (a local path or a Hub id) -> the field giving its Hub id
_INPUTS = {"task_model": "task_model_hub_id", "task_adapter": "task_adapter_hub_id",
           "task_reference": "task_reference_hub_id", "safety_vector": "safety_vector_hub_id"}


def _hub_id(ref: str | None) -> str | None:
    """Only Hub-looking ids go into `base_model` metadata (local paths are not valid there)."""
    if not ref:
        return None
    from .io.hub import is_repo_id

    return ref if is_repo_id(ref) and "/" in ref else None


def _input_id(ref: str | None, override: str | None) -> str | None:
    return override or _hub_id(ref)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v is None else str(v)


def _rev(rev: str | None) -> str:
    return f" (revision `{rev}`)" if rev else ""


def _ref_text(ref: str | None, hub: str | None, rev: str | None = None) -> str:
    if hub:
        return f"[{hub}](https://huggingface.co/{hub}){_rev(rev)}"
    if ref:
        return f"a local folder (`{Path(ref).name}`){_rev(rev)}"
    return "-"


def merge_base_models(config: SafetyMergeConfig, vector_config: SafetyVectorConfig | None = None) -> list[str]:
    """Every input with a Hub id, task model first: task model, LoRA adapter, task reference and
    the safety vector's aligned and reference models (`*_hub_id` config fields name local ones)."""
    ids = [
        _input_id(config.task_model, config.task_model_hub_id),
        _input_id(config.task_adapter, config.task_adapter_hub_id),
        _input_id(config.task_reference, config.task_reference_hub_id),
    ]
    if vector_config is not None:
        ids += [_input_id(vector_config.aligned_model, config.vector_aligned_hub_id),
                _input_id(vector_config.reference_model, config.vector_reference_hub_id)]
    else:
        ids += [config.vector_aligned_hub_id, config.vector_reference_hub_id]
    out: list[str] = []
    for i in ids:
        if i and i not in out:
            out.append(i)
    return out


def inherited_license(config: SafetyMergeConfig) -> str | None:
    """`config.license`, else the task model's licence: from its local README.md front matter, or
    from its Hub card (skipped offline; a failed look-up leaves the licence unset)."""
    if config.license:
        return config.license
    p = Path(config.task_model).expanduser()
    if (p / "README.md").is_file():
        try:
            lic = ModelCard.load(p / "README.md", ignore_metadata_errors=True).data.license
        except (OSError, ValueError, yaml.YAMLError):
            lic = None
        if lic:
            return str(lic)
    hub = _input_id(config.task_model, config.task_model_hub_id)
    if hub is None:
        return None
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        info = HfApi().model_info(hub, revision=config.task_model_revision if hub == config.task_model else None)
    except Exception:  # best effort: a licence look-up never fails a merge
        return None
    card_data = getattr(info, "card_data", None)
    lic = getattr(card_data, "license", None) if card_data is not None else None
    return str(lic) if lic else None


def published_config(config: SafetyMergeConfig) -> dict[str, Any]:
    """The merge configuration as a card shows it: no local paths (a Hub id, or `<local>`), no
    output folder, no push options, no unset fields."""
    d = config.to_dict()
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in _UNPUBLISHED or v is None or (k == "parameters" and not v):
            continue
        if k in _INPUTS:
            v = _input_id(v, d.get(_INPUTS[k])) or "<local>"
        out[k] = v
    return out


def resolved_parameters(method: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """Every parameter of `method` with the value the merge used (defaults filled in)."""
    from .merge import build_method

    params = build_method(method, parameters).params
    return [{"name": f.name, "value": getattr(params, f.name), "set": f.name in parameters}
            for f in dataclasses.fields(params)]


def _per_matrix(config: SafetyMergeConfig, result: MergeResult, vector: SafetyVector,
                params: dict[str, Any], limit: int = 200) -> tuple[str, str]:
    """(intro sentence, Markdown table) with the columns that mean something for the method."""
    rows = sorted(result.tensors.items())
    method = config.method
    if method == "enchtable":
        intro = ("Per weight matrix: the interference weight `w = exp(-I)`, the interference score `I` and the "
                 "number of singular triplets kept per side `r` (1-D tensors get `w = 1`).")
        table = ["| tensor | w | interference I | kept rank r |", "| --- | --- | --- | --- |"]
        for name, info in rows[:limit]:
            w = info.get("w")
            if "skipped" in info:
                table.append(f"| `{name}` | {_fmt(w)} | - | skipped: {info['skipped']} |")
            else:
                table.append(f"| `{name}` | {_fmt(w)} | {_fmt(info.get('interference'))} | {info.get('rank', '-')} |")
    elif method == "safe_lora":
        intro = (f"Per weight matrix: the cosine between the projected update `C tau` and `tau`, and whether the "
                 f"projection was applied (cosine <= threshold {_fmt(result.summary.get('threshold_used'))}).")
        table = ["| tensor | cosine(C tau, tau) | projected |", "| --- | --- | --- |"]
        for name, info in rows[:limit]:
            cos = info.get("cosine")
            table.append(f"| `{name}` | {_fmt(cos) if cos is not None else info.get('reason', '-')} | "
                         f"{'yes' if info.get('projected') else 'no'} |")
    else:
        norms = sorted(vector.config.tensor_norms.items())
        rows = [(n, {"norm": v}) for n, v in norms]
        if method == "task_arithmetic":
            scale = f"beta = {_fmt(params.get('beta'))}"
            intro = f"Every covered tensor gets the same scale ({scale}); listed with the safety vector's norm."
        else:
            scale = (f"density {_fmt(params.get('density'))}, weights {_fmt(params.get('task_weight'))} (task) / "
                     f"{_fmt(params.get('safety_weight'))} (safety)")
            intro = (f"{method.upper()} has no per-matrix weight: every covered tensor is merged with {scale}; "
                     "listed with the safety vector's norm.")
        table = ["| tensor | norm of Delta_s | merged with |", "| --- | --- | --- |"]
        for name, info in rows[:limit]:
            table.append(f"| `{name}` | {_fmt(info['norm'])} | {scale} |")
    if len(rows) > limit:
        table.append(f"| ... {len(rows) - limit} more in `merge_report.json` | | |" + (" |" if method == "enchtable" else ""))
    if len(rows) == 0:
        table.append("| (none) | | |" + (" |" if method == "enchtable" else ""))
    return intro + " Full per-tensor diagnostics are in `merge_report.json`.", "\n".join(table)


def merged_model_card(
    config: SafetyMergeConfig,
    result: MergeResult,
    *,
    task_display: str,
    vector: SafetyVector,
    eval_results: list[Any] | None = None,
) -> ModelCard:
    """The card of a patched model (see the module docstring); `eval_results` are
    `huggingface_hub.EvalResult`s for `model-index` (see also `attach_evaluation`)."""
    vc = vector.config
    base = merge_base_models(config, vc)
    model_name = (config.push_to_hub.split("/")[-1] if config.push_to_hub else "safety-patched-model")
    data = ModelCardData(
        library_name="transformers",
        base_model=base or None,
        base_model_relation="merge" if base else None,
        license=inherited_license(config),
        pipeline_tag="text-generation",
        tags=["safety", "hf-safety-merge", config.method, "merge"],
        eval_results=eval_results,
        model_name=model_name if eval_results else None,
    )
    params = resolved_parameters(config.method, config.parameters)
    pvals = {p["name"]: p["value"] for p in params}
    intro, table = _per_matrix(config, result, vector, pvals)
    hub = {k: _input_id(getattr(config, k), getattr(config, h)) for k, h in _INPUTS.items()}
    models = [{"role": "task model (fine-tuned)", "text": _ref_text(config.task_model, hub["task_model"], config.task_model_revision)}]
    if config.task_adapter:
        models.append({"role": "LoRA adapter", "text": _ref_text(config.task_adapter, hub["task_adapter"], config.task_adapter_revision)})
    if config.reference:
        ref_hub = hub["task_reference"] if config.task_reference else hub["task_model"]
        models.append({"role": "task reference (before fine-tuning)",
                       "text": _ref_text(config.reference, ref_hub, config.task_reference_revision)})
    models.append({"role": "safety vector", "text": _ref_text(config.safety_vector, hub["safety_vector"], config.safety_vector_revision)})
    models.append({"role": "safety vector's aligned model",
                   "text": _ref_text(vc.aligned_model, _input_id(vc.aligned_model, config.vector_aligned_hub_id), vc.aligned_revision)})
    models.append({"role": "safety vector's reference model",
                   "text": _ref_text(vc.reference_model, _input_id(vc.reference_model, config.vector_reference_hub_id), vc.reference_revision)})
    vector_lines = [
        f"vector: {_ref_text(config.safety_vector, hub['safety_vector'], config.safety_vector_revision)}",
        f"architecture: `{vc.architecture}`",
        f"computed by: `{vc.method}`; tensors: {vc.num_tensors}; parameters: {vc.num_parameters:,}; norm: {vc.norm:.6g}",
    ]
    if vc.library_version:
        vector_lines.append(f"library version: {vc.library_version}")
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        title=f"{config.push_to_hub.split('/')[-1]}: a safety-patched model" if config.push_to_hub else "Safety-patched model",
        task_display=_ref_text(config.task_model, hub["task_model"]).replace("a local folder", "a local fine-tune"),
        library_url=PROJECT_URL,
        method=config.method,
        method_text=_METHOD_TEXT.get(config.method, config.method),
        models_merged=models,
        parameters=[{**p, "value": _fmt(p["value"])} for p in params],
        num_merged=result.num_merged,
        num_tensors=result.num_tensors,
        summary=[(k, _fmt(v)) for k, v in result.summary.items()],
        vector_lines=vector_lines,
        eval_section="",
        config_yaml=yaml.safe_dump(published_config(config), sort_keys=False),
        table_intro=intro,
        table=table,
    )
    _check(card)
    return card


def safety_vector_card(cfg: SafetyVectorConfig) -> ModelCard:
    base = _hub_id(cfg.aligned_model)
    data = ModelCardData(
        library_name="hf-safety-merge",
        base_model=base,
        tags=["safety", "hf-safety-merge", "safety-vector"],
    )
    filt = yaml.safe_dump(cfg.tensor_filter, sort_keys=False) if cfg.tensor_filter else "{}\n"
    extra = yaml.safe_dump(cfg.extra, sort_keys=False) if cfg.extra else ""
    content = f"""---
{data.to_yaml()}
---

# Safety vector for {cfg.architecture}

`Delta_s = theta_aligned - theta_reference`, to be merged into fine-tuned models of the same
architecture with [hf-safety-merge]({PROJECT_URL}) (EnchTable, task arithmetic, Safe LoRA, TIES, DARE).

- aligned model: `{cfg.aligned_model}`{_rev(cfg.aligned_revision)}
- reference model: `{cfg.reference_model}`{_rev(cfg.reference_revision)}
- method: `{cfg.method}`
- tensors: {cfg.num_tensors}, parameters: {cfg.num_parameters:,}, global L2 norm: {cfg.norm:.6g}
- stored dtype: {cfg.dtype}
- created: {cfg.created_at} with hf-safety-merge {cfg.library_version}

Tensor filter:

```yaml
{filt}```
{("Details:" + chr(10) + chr(10) + "```yaml" + chr(10) + extra + "```" + chr(10)) if extra else ""}
## Usage

```python
from hf_safety_merge import AutoSafeModelForCausalLM
# the vector's aligned model is the task reference by default
model = AutoSafeModelForCausalLM.from_pretrained("your/fine-tuned-model", safety_vector="this/vector-repo")
```
"""
    return ModelCard(content)


# ------------------------------------------------------------------------------ validation
_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def _metadata(card: ModelCard) -> Any:
    m = re.match(r"^---\s*\n(.*?)\n---", card.content, re.S)
    meta = yaml.safe_load(m.group(1)) if m else {}
    return {} if meta is None else meta


def validate_card_metadata(card: ModelCard) -> list[str]:
    """Offline checks of a card's metadata against the Hub's rules (what `ModelCard.validate`
    asks the Hub to check; `validate_card(card, online=True)` asks the Hub itself):
    a YAML mapping that huggingface_hub's `ModelCardData` parses (its `model-index` reader and
    `EvalResult` checks included); `base_model` valid repo id(s); `base_model_relation` one of
    adapter/merge/quantized/finetune and only with a base model; `tags` a list of strings;
    string `library_name`/`license`/`pipeline_tag`. Returns the problems (empty when valid)."""
    errors: list[str] = []
    try:
        meta = _metadata(card)
    except yaml.YAMLError as e:
        return [f"metadata is not valid YAML: {e}"]
    if not isinstance(meta, dict):
        return ["metadata must be a YAML mapping"]
    try:  # huggingface_hub's own parsing: model-index -> EvalResult, with its validation
        ModelCardData(**{k: v for k, v in meta.items()})
    except (ValueError, TypeError, KeyError) as e:
        errors.append(f"huggingface_hub rejects the metadata: {str(e).splitlines()[0]}")
    base = meta.get("base_model")
    for b in [base] if isinstance(base, str) else (base or []):
        if not isinstance(b, str) or not _REPO_RE.match(b):
            errors.append(f"base_model {b!r} is not a Hub repo id")
    rel = meta.get("base_model_relation")
    if rel is not None:
        if rel not in _RELATIONS:
            errors.append(f"base_model_relation {rel!r} is not one of {_RELATIONS}")
        if base is None:
            errors.append("base_model_relation is set but base_model is not")
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append("tags must be a list of strings")
    for key in ("library_name", "license", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f"{key} must be a string")
    mi = meta.get("model-index")
    if mi is not None and not (
        isinstance(mi, list) and all(isinstance(x, dict) and "name" in x and isinstance(x.get("results"), list) for x in mi)
    ):
        errors.append("model-index must be a list of {name, results}")
    return errors


def validate_card(card: ModelCard, *, online: bool = False) -> None:
    """Raise `ValueError` if the card's metadata is invalid: offline rules always, and with
    `online=True` also the Hub's own check (`huggingface_hub.ModelCard.validate`)."""
    _check(card)
    if online:
        card.validate()


def _check(card: ModelCard) -> None:
    errors = validate_card_metadata(card)
    if errors:
        raise ValueError(f"card metadata would be invalid: {errors}")


# ------------------------------------------------------------------------------ evaluation
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
    from .eval.report import ModelReport

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
    from .eval.report import EvalReport, ModelReport, eval_results

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
    from .errors import ConfigError

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ConfigError(f"--update-card: {model_dir} is not a local model folder (download it, evaluate the folder, "
                          "then push it with `hf-safety-merge push`)")
    after = report.models[0]
    before = report.models[1].model if len(report.models) > 1 else None
    attach_evaluation(folder, report, model=after.model, baseline=before)
    return (f"updated {folder / 'README.md'}: evaluation section and model-index "
            f"({after.model}{', before: ' + before if before else ''})")
