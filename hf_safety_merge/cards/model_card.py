"""The merged model's card: every input as `base_model`, resolved parameters, summary, per-matrix table."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .checks import _check, _metadata

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from ..merge.config import SafetyMergeConfig
    from ..merge.result import MergeResult
    from ..vectors import SafetyVector, SafetyVectorConfig

#: where the library lives (setup.cfg `url`); cards link here
PROJECT_URL = "https://pypi.org/project/hf-safety-merge/"
TEMPLATE_PATH = Path(__file__).parent.parent / "templates" / "merged_model_card.md"

#: config fields never published in a card (local output, publishing options, card options)
_UNPUBLISHED = ("output_dir", "overwrite", "push_to_hub", "private", "create_pr", "commit_message", "license",
                "task_model_hub_id", "task_adapter_hub_id", "task_reference_hub_id", "safety_vector_hub_id",
                "vector_aligned_hub_id", "vector_reference_hub_id")
#: config fields that name an input (a local path or a Hub id) -> the field giving its Hub id
_INPUTS = {"task_model": "task_model_hub_id", "task_adapter": "task_adapter_hub_id",
           "task_reference": "task_reference_hub_id", "safety_vector": "safety_vector_hub_id"}


def _method_text(method: str) -> str:
    """The method's card paragraph, from its class (`card_text`)."""
    from ..methods.base import get_method_class

    return get_method_class(method).card_text or method


def _hub_id(ref: str | None) -> str | None:
    """Only Hub-looking ids go into `base_model` metadata (local paths are not valid there)."""
    if not ref:
        return None
    from ..io.hub import is_repo_id

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
            meta = _metadata(RenderedCard((p / "README.md").read_text(encoding="utf-8")))
            lic = meta.get("license") if isinstance(meta, dict) else None
        except (OSError, ValueError, yaml.YAMLError):
            lic = None
        if lic:
            return str(lic)
    hub = _input_id(config.task_model, config.task_model_hub_id)
    if hub is None:
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    from huggingface_hub import HfApi
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
    from ..methods.base import build_method

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


class RenderedCard:
    """A rendered model card: its full text (YAML metadata block + Markdown), exactly what
    `huggingface_hub.ModelCard(content)` holds and saves. The merge engine writes this form:
    rendering needs only `huggingface_hub.repocard_data` and jinja2, not `huggingface_hub.repocard`
    (which imports the Hub client, ~0.2 s of a merge's start-up); `to_model_card()` gives the
    `ModelCard` (tested equal, byte for byte, to `ModelCard.from_template` of the same data)."""

    def __init__(self, content: str) -> None:
        self.content = content

    def __str__(self) -> str:
        return self.content

    def save(self, filepath: str | Path) -> None:
        """Write the card as `ModelCard.save` does (UTF-8, line endings kept)."""
        path = Path(filepath)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, mode="w", newline="", encoding="utf-8") as f:
            f.write(self.content)

    def to_model_card(self) -> ModelCard:
        from huggingface_hub import ModelCard

        return ModelCard(self.content)


@functools.lru_cache(maxsize=8)
def _template(template_path: Path) -> Any:
    """The compiled jinja2 template at `template_path` (package data): read and compiled once
    per process (~0.015 s); `prepare_rendering` compiles the merged-model card's ahead of time."""
    import jinja2

    return jinja2.Template(template_path.read_text(encoding="utf-8"))


def prepare_rendering() -> None:
    """Import what rendering a card needs and compile the merged-model card's template (the
    merge engine runs this on a background thread while it merges: `CardSink.prepare`)."""
    import huggingface_hub.repocard_data  # noqa: F401

    _template(TEMPLATE_PATH)


def _render(data: Any, template_path: Path, **template_kwargs: Any) -> str:
    """`ModelCard.from_template(data, template_path, **kwargs)`'s text, rendered the same way
    (card data fields as template variables, the keyword arguments taking priority)."""
    kwargs = data.to_dict().copy()
    kwargs.update(template_kwargs)
    template = _template(template_path)
    return template.render(card_data=data.to_yaml(), **kwargs)


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
    return render_merged_model_card(config, result, task_display=task_display, vector=vector,
                                    eval_results=eval_results).to_model_card()


def render_merged_model_card(
    config: SafetyMergeConfig,
    result: MergeResult,
    *,
    task_display: str,
    vector: SafetyVector,
    eval_results: list[Any] | None = None,
) -> RenderedCard:
    """`merged_model_card`'s text as a `RenderedCard` (what the merge engine saves; no import of
    `huggingface_hub.repocard`)."""
    from huggingface_hub.repocard_data import ModelCardData

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
    card = RenderedCard(_render(
        data,
        TEMPLATE_PATH,
        title=f"{config.push_to_hub.split('/')[-1]}: a safety-patched model" if config.push_to_hub else "Safety-patched model",
        task_display=_ref_text(config.task_model, hub["task_model"]).replace("a local folder", "a local fine-tune"),
        library_url=PROJECT_URL,
        method=config.method,
        method_text=_method_text(config.method),
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
    ))
    _check(card)
    return card
