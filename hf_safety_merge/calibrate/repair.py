"""`repair`: the repair a user would ship, searched across methods and scales.

One search, on calibration prompts disjoint from any report's: EnchTable with each safety vector
given, RESTA (`task_arithmetic`), Safe LoRA (with the alignment vector), and the TIES/DARE
densities, each scale searched constraint-first (`calibrate.search`). The task model and every
vector are read once (`ScaledMerge`, the task tensors shared between vectors), EnchTable's
interference terms are computed once per vector and reused by every beta, the unpatched model is
evaluated once. The choice across methods: the least unsafe of the settings that keep the hard
constraints (ties: the smaller over-refusal rise, then the higher utility, then the order of
`methods`). The chosen model is merged once, streaming, with a card that shows the whole search
(a curve per method with intervals), the choice, and, when asked, the check on held-out prompts.

Layer 5 (docs/architecture.md). Its config is :mod:`.repair_config`, its result types
:mod:`.repair_result`, its card :mod:`.repair_card`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError
from ..eval.prompts import load_prompts, split_prompts
from ..merge.calibration_config import CalibrationConfig
from ..methods.base import get_method_class
from .probes import ScaledMerge, with_parameter
from .repair_config import RepairConfig, label
from .repair_result import MethodSearch, RepairResult
from .run import calibration_prompts, evaluate_probe, generation_options, warn_resolution
from .search import Probe, search_scale


def _pick(searches: list[MethodSearch]) -> MethodSearch | None:
    ok = [s for s in searches if s.search.feasible]
    if not ok:
        return None
    base = ok[0].search.baseline

    def key(i_s: tuple[int, MethodSearch]) -> tuple[float, float, float, int]:
        i, s = i_s
        c = s.search.chosen
        rise = (c.over_refusal.value - base.over_refusal.value) if (c.over_refusal and base and base.over_refusal) else 0.0
        util = -(c.utility.value if c.utility is not None else 0.0)
        return (c.unsafe.k / max(c.unsafe.n, 1), rise, util, i)

    return min(enumerate(ok), key=key)[1]


def repair(
    config: RepairConfig | dict[str, Any],
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    on_probe: Callable[[str, Probe], None] | None = None,
    write: bool = True,
    on_infeasible: str = "raise",
) -> RepairResult:
    """Search method x scale on calibration prompts, choose constraint-first, merge the choice.

    Writes the repaired model into `output_dir` (or ``config.output_dir``) with `repair.json`,
    `repair.png` and a "Repair" section in its card; with ``write=False`` only searches.
    `on_probe(label, probe)` is called after each probe. Raises `CalibrationError` (writing
    nothing) when no setting of any method keeps the hard constraints, unless the calibration
    sets ``allow_constraint_violation`` (``on_infeasible="return"``: the result, with
    ``chosen=None``, nothing written).
    """
    if on_infeasible not in ("raise", "return"):
        raise ConfigError(f"repair: on_infeasible must be 'raise' or 'return', got {on_infeasible!r}")
    from ..eval.suite import SafetyEvalConfig
    from ..io.output import check_output_dir

    cfg = config if isinstance(config, RepairConfig) else RepairConfig(**config)
    cal = cfg.calibration
    assert isinstance(cal, CalibrationConfig)
    out = output_dir if output_dir is not None else cfg.output_dir
    if write:
        if out is None:
            raise ConfigError("repair: no output folder: set `output_dir` in the config or pass --out")
        check_output_dir(out, cfg.overwrite, inputs=[cfg.task_model, cfg.task_adapter, cfg.task_reference,
                                                     *cfg.safety_vectors, cfg.alignment_vector])
    notes: list[str] = []
    if cfg.alignment_vector is None:
        notes += [f"{label(m)} skipped: no `alignment_vector` (W_aligned - W_base) given"
                  for m in cfg.methods if get_method_class(m).vector_kind == "alignment"]
    t0 = time.perf_counter()
    sets = calibration_prompts(cal)
    notes += warn_resolution(cal, sets, "repair")
    seconds: dict[str, float] = {}
    searches: list[MethodSearch] = []
    shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    opened: dict[str, ScaledMerge] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-safety-repair-")))
        cands = cfg.candidates()
        if not cands:
            raise ConfigError("repair: nothing to search (the methods given need `alignment_vector`)")
        closed_form = [m for m in cfg.methods if get_method_class(m).closed_form_scale]

        def open_vector(method: str, vector: str) -> ScaledMerge:
            # one ScaledMerge per vector, opened for the closed-form method when one is searched
            # (EnchTable: its per-matrix terms need it); the others re-run their formula on it
            alignment = get_method_class(method).vector_kind == "alignment"
            key = vector if not alignment else f"{method}:{vector}"
            if key not in opened:
                first = closed_form[0] if closed_form and not alignment else method
                mcfg = cfg.merge_config(first, vector)
                par = cal.scale_for(first)[0]
                sm = ScaledMerge(mcfg, par, progress=progress, shared=shared)
                stack.callback(sm.close)
                opened[key] = sm
            return opened[key]

        first_sm = open_vector(*cands[0])
        model, tok, state = first_sm.load_model()
        original: dict[str, torch.Tensor] = {}
        touched: set[str] = set()
        ecfg = SafetyEvalConfig(harmful=sets["harmful"], harmful_eval_size=None, benign=sets["benign"],
                                utility=sets.get("utility"), utility_metric=cal.utility_metric, judge=cal.judge,
                                max_new_tokens=cal.max_new_tokens, batch_size=cal.batch_size, data_dir=cal.data_dir,
                                **generation_options(cal))
        seconds["prepare"] = time.perf_counter() - t0

        def restore() -> None:
            with torch.no_grad():
                for n in touched:
                    state[n].copy_(original[n])
            touched.clear()

        def load(merged: dict[str, torch.Tensor]) -> None:
            restore()
            with torch.no_grad():
                for n, v in merged.items():
                    if n not in original:
                        original[n] = state[n].detach().clone()
                    state[n].copy_(v)
                    touched.add(n)

        baseline = evaluate_probe(model, tok, ecfg, "task model", tmp, sets, device=cfg.device)
        seconds["baseline"] = baseline.seconds
        for i, (method, vector) in enumerate(cands):
            sm = open_vector(method, vector)
            parameter, low, high, integer = cal.scale_for(
                method, num_matrices=sum(1 for n in sm.names if sm.delta[n].ndim == 2))
            if method in cfg.ranges:
                low, high = cfg.ranges[method]
            fixed = cfg.parameters.get(method, {})
            name = label(method) + (f" ({Path(vector).name})" if get_method_class(method).closed_form_scale else "")

            def probe(scale: float, sm: ScaledMerge = sm, method: str = method, parameter: str = parameter,
                      fixed: dict[str, Any] = fixed, name: str = name, i: int = i) -> Probe:
                t = time.perf_counter()
                merged, summary = sm.merged(scale, method, parameter, fixed)
                load(merged)
                p = evaluate_probe(model, tok, ecfg, f"{i}-{method}-{parameter}={scale:.4g}", tmp, sets, device=cfg.device)
                p.scale, p.seconds = scale, time.perf_counter() - t
                p.extra.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
                if on_probe is not None:
                    on_probe(name, p)
                return p

            t = time.perf_counter()
            res = search_scale(probe, low, high, target=cal.target(), max_probes=cal.max_probes, integer=integer,
                               baseline=baseline)
            seconds[f"search {name}"] = time.perf_counter() - t
            searches.append(MethodSearch(method, vector, parameter, res))
        chosen = _pick(searches)
        prompts = {k: {"source": v.source, "n": len(v.items),
                       "side": "train side of the report's 50/50 split" if cal.holdout_split else "held out from every report"}
                   for k, v in sets.items()}
        result = RepairResult(cfg, searches, baseline, chosen, prompts, seconds=seconds, notes=notes)
        if chosen is None:
            restore()
            if not write or on_infeasible == "return":
                return result
            raise CalibrationError("repair: no setting of any method keeps the constraints (over-refusal rise <= "
                                   f"{cal.max_over_refusal_increase} at {100 * cal.confidence:.0f}% one-sided"
                                   + (f", utility drop <= {cal.max_utility_drop}" if cal.max_utility_drop is not None else "")
                                   + "); nothing written. " + "; ".join(
                                       f"{s.label}: {s.search.message(s.parameter)}" for s in searches))
        sm = open_vector(chosen.method, chosen.vector)
        if cfg.check_harmful or cfg.check_benign:
            t = time.perf_counter()
            restore()
            result.check["task model"] = _check(model, tok, cfg, "check-task", tmp)
            merged, _ = sm.merged(chosen.search.chosen.scale, chosen.method, chosen.parameter,
                                  cfg.parameters.get(chosen.method, {}))
            load(merged)
            result.check["repaired"] = _check(model, tok, cfg, "check-repaired", tmp)
            seconds["held-out check"] = time.perf_counter() - t
        restore()
        chosen.final_method = _final_method(sm, chosen, cfg)
    seconds["search total"] = time.perf_counter() - t0
    if not write:
        return result
    from ..merge.engine import merge

    assert chosen is not None and out is not None
    final = with_parameter(cfg.merge_config(chosen.method, chosen.vector, str(out)), chosen.parameter,
                           chosen.search.chosen.scale)

    def finalize(folder: Path) -> list[str]:
        from .repair_card import write_repair

        return write_repair(folder, result)

    t = time.perf_counter()
    merge(final, output_dir=out, progress=progress, finalize=finalize, method_instance=chosen.final_method)
    seconds["final merge"] = time.perf_counter() - t
    result.output_dir = Path(out)
    return result


def _final_method(sm: ScaledMerge, chosen: MethodSearch, cfg: RepairConfig) -> Any:
    from ..methods.base import build_method

    if get_method_class(chosen.method).closed_form_scale:  # the terms computed during the search
        return sm.final_method(chosen.search.chosen.scale)

    params = {**cfg.parameters.get(chosen.method, {}), chosen.parameter: (
        int(chosen.search.chosen.scale) if chosen.parameter == "num_proj_layers" else chosen.search.chosen.scale)}
    return build_method(chosen.method, params)


def _check(model: Any, tok: Any, cfg: RepairConfig, label: str, tmp: Path) -> dict[str, Any]:
    """The held-out check: the *eval* sides of the calibration sources' splits."""
    from ..eval.suite import SafetyEvalConfig, evaluate_safety

    cal = cfg.calibration
    assert isinstance(cal, CalibrationConfig)
    hs = load_prompts(cal.harmful, data_dir=cal.data_dir)
    bs = load_prompts(cal.benign, data_dir=cal.data_dir)
    harmful = split_prompts(hs, 0.5, cal.split_seed)[1]
    benign = split_prompts(bs, 0.5, cal.split_seed)[1]
    ecfg = SafetyEvalConfig(harmful=_first(harmful, cfg.check_harmful), harmful_eval_size=None,
                            benign=_first(benign, cfg.check_benign) if cfg.check_benign else None, judge=cal.judge,
                            max_new_tokens=cal.max_new_tokens, batch_size=cal.batch_size, data_dir=cal.data_dir,
                            **generation_options(cal))
    rep = evaluate_safety(model, tok, config=ecfg, model_name=label, progress=False, device=cfg.device, output_dir=tmp)
    return {"unsafe": rep.unsafe_rate.to_dict(), "over_refusal": rep.over_refusal.to_dict() if rep.over_refusal else None,
            "prompts": {"harmful": len(ecfg.harmful.items), "benign": cfg.check_benign}}


def _first(ps: Any, n: int) -> Any:
    return dataclasses.replace(ps, items=list(ps.items)[:n]) if n and len(ps.items) > n else ps
