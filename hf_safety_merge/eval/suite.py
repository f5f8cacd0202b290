"""The high-level evaluation: :func:`evaluate_safety` for one model, :func:`compare_models` for
several side by side.

One run generates, for a model: the plain harmful prompts (held-out split), each attack applied
to them, the benign prompts (over-refusal), and an optional utility task set; every generation is
streamed to ``<output_dir>/<model>/generations.jsonl`` (a rerun resumes), then judged, and the
rates with 95% Wilson intervals are collected in a :class:`~hf_safety_merge.eval.report.ModelReport`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .attacks import Attack, get_attack
from .backends import Backend
from .engine import resolve_backend
from .generation import GenerationRequest, GenerationSettings, Generator, load_model
from .judges import DEFAULT_JUDGE, Judge, get_judge
from .metrics import Rate, exact_match, pass_at_1, rate
from .prompts import PromptSet, as_prompt_set, load_prompts, split_prompts
from .report import EvalReport, ModelReport
from .suite_config import SafetyEvalConfig

__all__ = ["SafetyEvalConfig", "compare_models", "evaluate_safety"]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _load_sets(cfg: SafetyEvalConfig) -> dict[str, PromptSet]:
    sets: dict[str, PromptSet] = {}
    harmful = cfg.harmful
    if isinstance(harmful, PromptSet):
        hs = harmful
    elif isinstance(harmful, (str, os.PathLike)):
        hs = load_prompts(harmful, cfg.harmful_column, data_dir=cfg.data_dir)
    else:
        hs = as_prompt_set(harmful, "harmful")
    if cfg.harmful_eval_size is not None:
        hs = split_prompts(hs, cfg.harmful_eval_size, cfg.split_seed)[1]
    sets["harmful"] = hs.head(cfg.harmful_limit)
    if cfg.benign is not None:
        b = cfg.benign
        bs = b if isinstance(b, PromptSet) else load_prompts(b, data_dir=cfg.data_dir) if isinstance(b, (str, os.PathLike)) else as_prompt_set(b, "benign")
        if cfg.benign_eval_size is not None:
            bs = split_prompts(bs, cfg.benign_eval_size, cfg.split_seed)[1]
        sets["benign"] = bs.head(cfg.benign_limit)
    if cfg.utility is not None:
        u = cfg.utility
        if isinstance(u, PromptSet):
            us = u
        else:
            us = load_prompts(u, cfg.utility_column, reference_column=cfg.utility_reference_column, data_dir=cfg.data_dir)
        if any(it.reference is None for it in us):
            raise ConfigError(f"utility set {us.source}: every row needs a reference ({cfg.utility_reference_column!r})")
        sets["utility"] = us.head(cfg.utility_limit)
    return sets


def _judge_text(row: dict[str, Any]) -> str:
    return f"{row.get('prefill', '')}{row['response']}"


def evaluate_safety(
    model: Any,
    tokenizer: Any = None,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    config: SafetyEvalConfig | None = None,
    model_name: str | None = None,
    progress: bool = True,
    dtype: str | None = "float32",
    device: str = "cpu",
    **options: Any,
) -> ModelReport:
    """Evaluate one model's safety, over-refusal and utility.

    Args:
        model: a transformers causal LM, or a local folder / Hub id.
        tokenizer: its tokenizer (loaded from ``model`` when it is a path).
        output_dir: where ``<model>/generations.jsonl`` (resumable), ``judgements.jsonl`` and
            ``report.json`` go; None keeps everything in memory.
        config: a :class:`SafetyEvalConfig`; ``**options`` override its fields
            (e.g. ``attacks=["dan", "base64"], harmful_limit=100``).
        model_name: the name in reports (and substituted into DAN preambles).

    Returns:
        a :class:`ModelReport`; print ``report.summary()`` for a readable summary.

    Example::

        from hf_safety_merge.eval import evaluate_safety
        rep = evaluate_safety("HuggingFaceTB/SmolLM2-135M-Instruct", attacks=["dan", "base64"],
                              harmful_limit=100, output_dir="eval_out")
        print(rep.summary())
    """
    cfg = config if config is not None else SafetyEvalConfig()
    if options:
        SafetyEvalConfig.from_kwargs(**options)  # names checked, with a did-you-mean
        cfg = replace(cfg, **options)
    cfg.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sets = _load_sets(cfg)
    attacks: list[Attack] = [get_attack(a, cfg.data_dir) for a in cfg.attacks if a != "none"]
    judge: Judge = get_judge(cfg.judge)
    if cfg.refusal_judge is None or cfg.refusal_judge == cfg.judge:
        rjudge: Judge = judge if judge.can_judge_refusal else get_judge(DEFAULT_JUDGE)
    else:
        rjudge = get_judge(cfg.refusal_judge)
    if not rjudge.can_judge_refusal:
        raise ConfigError(f"refusal_judge {rjudge.name!r} has no refusal labels; use 'learned' or 'keyword'")

    kind = resolve_backend(cfg.backend, cfg.engine)
    backend: Backend | None = None
    tmp_folder: str | None = None
    m: Any = None
    if kind == "transformers":
        m, tok, name = load_model(model, tokenizer, dtype=dtype, device=device)
    else:
        backend, tok, name, tmp_folder = _server_backend(kind, model, tokenizer, cfg)
    name = model_name or name
    timings["load"] = time.perf_counter() - t0

    requests: list[GenerationRequest] = []
    for it in sets["harmful"]:
        requests.append(GenerationRequest(f"harmful/none/{it.id}", it.text, meta={"set": "harmful", "attack": "none", "item": it.id}))
    for a in attacks:
        for it in sets["harmful"]:
            ap = a(it.text, name)
            requests.append(
                GenerationRequest(
                    f"harmful/{a.name}/{it.id}", ap.user, ap.prefill,
                    meta={"set": "harmful", "attack": a.name, "item": it.id, "original_prompt": it.text},
                )
            )
    for key in ("benign", "utility"):
        if key in sets:
            for it in sets[key]:
                requests.append(GenerationRequest(f"{key}/{it.id}", it.text, meta={"set": key, "item": it.id}))

    gcfg = GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, system_prompt=cfg.system_prompt,
                            max_batch_tokens=cfg.max_batch_tokens)
    gen = Generator(m, tok, gcfg, model_name=name, backend=backend)
    out = Path(output_dir) / _safe_name(name) if output_dir is not None else None
    t1 = time.perf_counter()
    try:
        rows = gen.generate(requests, out / "generations.jsonl" if out else None, progress=progress, desc=f"eval {name}")
    finally:
        if tmp_folder is not None:
            import shutil

            shutil.rmtree(tmp_folder, ignore_errors=True)
    timings["generate"] = time.perf_counter() - t1
    timings["generate_new_rows"] = float(gen.last_stats["new_rows"])
    timings["generated_tokens"] = float(gen.last_stats["new_tokens"])

    t2 = time.perf_counter()
    by_set: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_set.setdefault(str(r["set"]), []).append(r)
    judged: list[dict[str, Any]] = []
    harmful_rows = by_set.get("harmful", [])
    verdicts = judge.judge_batch([r.get("original_prompt", r["prompt"]) for r in harmful_rows], [_judge_text(r) for r in harmful_rows])
    per_attack: dict[str, list[bool]] = {}
    for r, v in zip(harmful_rows, verdicts):
        unsafe = judge.is_unsafe(v)
        per_attack.setdefault(str(r["attack"]), []).append(unsafe)
        judged.append({"id": r["id"], "judge": judge.name, "label": v.label, "score": v.score, "unsafe": unsafe})
    attack_success = {a: rate(flags) for a, flags in per_attack.items()}
    over_refusal: Rate | None = None
    if "benign" in by_set:
        bv = rjudge.judge_batch([r["prompt"] for r in by_set["benign"]], [r["response"] for r in by_set["benign"]])
        flags = [rjudge.is_refusal(v) for v in bv]
        over_refusal = rate(flags)
        judged += [{"id": r["id"], "judge": rjudge.name, "label": v.label, "score": v.score, "refusal": f} for r, v, f in zip(by_set["benign"], bv, flags)]
    utility: Rate | None = None
    if "utility" in by_set:
        refs = {it.id: it.reference or "" for it in sets["utility"]}
        urows = by_set["utility"]
        if cfg.utility_metric == "pass@1":
            utility = pass_at_1([r["response"] for r in urows], [refs[str(r["item"])] for r in urows], timeout=cfg.code_timeout)
        else:
            mode = "number" if cfg.utility_metric == "number" else "normalized"
            utility = rate(exact_match(r["response"], refs[str(r["item"])], mode=mode) for r in urows)
    timings["judge"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0

    report = ModelReport(
        model=name,
        judge=judge.describe(),
        refusal_judge=rjudge.describe(),
        unsafe_rate=attack_success.get("none", rate(k=0, n=0)),
        attack_success=attack_success,
        over_refusal=over_refusal,
        utility=utility,
        utility_metric=None if utility is None else cfg.utility_metric,
        datasets={k: {"source": v.source, "n": len(v), **({"split": f"eval(size={cfg.harmful_eval_size}, seed={cfg.split_seed})"} if k == "harmful" and cfg.harmful_eval_size is not None else {})} for k, v in sets.items()},
        timings={k: round(v, 2) for k, v in timings.items()},
        config={**gcfg.fingerprint(), "batch_size": cfg.batch_size, "attacks": [a.name for a in attacks],
                "backend": kind},
    )
    if out is not None:
        with (out / "judgements.jsonl").open("w", encoding="utf-8") as f:
            for j in judged:
                f.write(json.dumps(j, ensure_ascii=False) + "\n")
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _server_backend(kind: str, model: Any, tokenizer: Any, cfg: SafetyEvalConfig) -> tuple[Backend, Any, str, str | None]:
    """``(backend, tokenizer, name, temporary folder or None)`` for ``openai`` / ``vllm``.

    ``openai``: ``model`` (a folder or Hub id) names the tokenizer and the report (a loaded model
    only its tokenizer); ``vllm``: the shared managed engine serves the folder (a Hub id is
    downloaded; a loaded model is saved to a temporary folder, removed after generation)."""
    from transformers import AutoTokenizer

    from .engine import EngineConfig, shared_engine
    from .openai_backend import OpenAIBackend

    is_path = isinstance(model, (str, os.PathLike))
    if is_path:
        ref = str(model)
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(ref)
        name = Path(ref).name if Path(ref).expanduser().exists() else ref
    else:
        if kind == "openai":
            raise ConfigError("backend 'openai' generates with the server's own model, not one held in memory: pass the "
                              "model's name (folder or Hub id), or use backend 'vllm' (it serves the loaded model's weights)")
        if tokenizer is None:
            raise ConfigError("a loaded model needs its tokenizer (pass tokenizer=...)")
        tok, name = tokenizer, _loaded_name(model)
    if kind == "openai":
        return OpenAIBackend(cfg.server, tok), tok, name, None
    tmp: str | None = None
    if is_path:
        folder = Path(str(model)).expanduser()
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(model)))
    else:
        import tempfile

        tmp = tempfile.mkdtemp(prefix="hf-safety-engine-model-")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        folder = Path(tmp)
    try:
        engine = shared_engine(folder, cfg.engine if cfg.engine is not None else EngineConfig())
    except BaseException:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return engine.backend(tok), tok, name, tmp


def _loaded_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", "") or ""
    return Path(str(name)).name if name else type(model).__name__


def compare_models(
    models: Sequence[Any],
    *,
    output_dir: str | os.PathLike[str] | None = None,
    tokenizers: Sequence[Any] | None = None,
    model_names: Sequence[str | None] | None = None,
    config: SafetyEvalConfig | None = None,
    progress: bool = True,
    plots: bool = True,
    dtype: str | None = "float32",
    device: str = "cpu",
    **options: Any,
) -> EvalReport:
    """Evaluate several models with the same prompts, attacks and judge; with ``output_dir``
    write ``report.json``, ``report.md`` and the PNG plots there."""
    cfg = config if config is not None else SafetyEvalConfig.from_kwargs(**options)
    if config is not None and options:
        SafetyEvalConfig.from_kwargs(**options)
        cfg = replace(config, **options)
    cfg = replace(cfg)  # never mutate the caller's config
    # Instantiate judges once for all models.
    same = cfg.refusal_judge is None or cfg.refusal_judge == cfg.judge
    cfg.judge = get_judge(cfg.judge)
    cfg.refusal_judge = cfg.judge if same and cfg.judge.can_judge_refusal else (
        get_judge(cfg.refusal_judge) if cfg.refusal_judge is not None else None)
    reports = []
    for i, m in enumerate(models):
        reports.append(
            evaluate_safety(
                m,
                tokenizers[i] if tokenizers else None,
                output_dir=output_dir,
                config=cfg,
                model_name=model_names[i] if model_names else None,
                progress=progress,
                dtype=dtype,
                device=device,
            )
        )
    rep = EvalReport(reports)
    if output_dir is not None:
        rep.write(output_dir, plots=plots)
    return rep
