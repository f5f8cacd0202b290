"""`calibrate`: search a merge's scale against a safety target, then merge once at the chosen point.

Each probe is an in-memory merge (see `ScaledMerge`) plus one batched evaluation of the
calibration prompts; nothing is written until the chosen scale is merged, streaming, by the
ordinary engine. The model card gets a "Calibration" section (the curve, the chosen point, the
target, and the caveat that a rate met on n prompts holds on new prompts only up to its
interval), `merge_report.json` gets the raw numbers, and `calibration.png` the plot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError
from ..eval.prompts import PromptSet, load_prompts, split_prompts
from ..merge.calibration_config import CalibrationConfig
from ..merge.config import SafetyMergeConfig
from .probes import ScaledMerge, with_parameter
from .search import Probe, SearchResult, resolution_notes, search_scale

logger = logging.getLogger("hf_safety_merge.calibrate")


@dataclass
class CalibrationResult:
    """What calibration measured and chose."""

    method: str
    parameter: str
    search: SearchResult
    baseline: Probe
    config: CalibrationConfig
    prompts: dict[str, dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    #: the method to merge with at the chosen scale (reuses what calibration computed)
    final_method: Any = None

    @property
    def value(self) -> float:
        return self.search.chosen.scale

    @property
    def met(self) -> bool:
        return self.search.met

    def message(self) -> str:
        return self.search.message(self.parameter)

    def to_dict(self) -> dict[str, Any]:
        t = self.config
        return {
            "method": self.method, "parameter": self.parameter, "chosen": self.value, "met": self.met,
            "message": self.message(), "strategy": self.search.strategy, "misses": self.search.misses,
            "feasible": self.search.feasible,
            "target": {"max_unsafe": t.max_unsafe, "max_over_refusal_increase": t.max_over_refusal_increase,
                       "min_utility": t.min_utility, "max_utility_drop": t.max_utility_drop, "confidence": t.confidence,
                       "allow_constraint_violation": t.allow_constraint_violation},
            "constraints": {"chosen": self.search.chosen.checks(t.target(), self.baseline)},
            "baseline": self.baseline.to_dict(), "probes": [p.to_dict() for p in self.search.probes],
            "prompts": self.prompts, "judge": t.judge, "seconds": self.seconds,
        }

    def table(self) -> str:
        """The curve as a markdown table (scale -> unsafe, over-refusal, utility with intervals)."""
        head = f"| {self.parameter} | unsafe | over-refusal | utility | |\n| --- | --- | --- | --- | --- |\n"
        rows = [_row("task model (unpatched)", self.baseline, "")]
        for p in sorted(self.search.probes, key=lambda p: p.scale):
            rows.append(_row(f"{p.scale:.4g}", p, "chosen" if p is self.search.chosen else ""))
        return head + "\n".join(rows)


def _fmt(r: Any) -> str:
    return "-" if r is None else f"{r.value:.3f} [{r.low:.3f}, {r.high:.3f}] (n={r.n})"


def _row(label: str, p: Probe, note: str) -> str:
    return f"| {label} | {_fmt(p.unsafe)} | {_fmt(p.over_refusal)} | {_fmt(p.utility)} | {note} |"


def calibration_prompts(cfg: CalibrationConfig) -> dict[str, PromptSet]:
    """The calibration sets: the *train* sides of the seeded splits whose other sides reports test
    on (harmful: `harmful_eval_size` 0.5; benign: `benign_eval_size` 0.5), sampled to size."""
    hs = load_prompts(cfg.harmful, data_dir=cfg.data_dir)
    harmful = split_prompts(hs, 0.5, cfg.split_seed)[0] if cfg.holdout_split else hs
    bs = load_prompts(cfg.benign, data_dir=cfg.data_dir)
    benign = split_prompts(bs, 0.5, cfg.split_seed)[0] if cfg.holdout_split else bs
    sets = {"harmful": _sample(harmful, cfg.num_harmful, cfg.seed), "benign": _sample(benign, cfg.num_benign, cfg.seed)}
    if cfg.utility is not None:
        us = load_prompts(cfg.utility, data_dir=cfg.data_dir, reference_column="answer")
        sets["utility"] = _sample(us, cfg.num_utility, cfg.seed)
    return sets


def _sample(ps: PromptSet, n: int, seed: int) -> PromptSet:
    if len(ps.items) <= n:
        return ps
    return split_prompts(ps, n, seed + 1)[1]


def generation_options(cal: CalibrationConfig) -> dict[str, Any]:
    """``backend`` / ``engine`` of the probes' evaluations (an in-memory model: a served
    ``openai`` endpoint cannot take its weights, so only transformers or the managed vLLM)."""
    if cal.backend == "transformers":
        return {"backend": "transformers"}
    from ..eval.engine import EngineConfig

    return {"backend": cal.backend, "engine": EngineConfig(python=cal.vllm_python)}


def warn_resolution(cal: CalibrationConfig, sets: dict[str, PromptSet], who: str) -> list[str]:
    """Warn (and return the lines) when the calibration sets are too few for a hard constraint to
    resolve one prompt (`search.resolution_notes`): said once, before the search starts."""
    notes = resolution_notes(cal.target(), len(sets["benign"].items), len(sets["utility"].items) if "utility" in sets else None)
    for note in notes:
        logger.warning("%s: %s", who, note)
    return notes


def evaluate_probe(model: Any, tok: Any, ecfg: Any, label: str, tmp: Path, sets: dict[str, PromptSet], *,
                   device: str = "cpu") -> Probe:
    """Evaluate the model as it stands on the calibration sets, with its per-prompt outcomes
    (``unsafe`` per harmful prompt, ``refusal`` per benign prompt, ``utility`` per task prompt)
    for the paired constraint checks. `label` names the row in `tmp` (one per probe)."""
    from ..eval.metrics import exact_match
    from ..eval.suite import _safe_name, evaluate_safety

    t = time.perf_counter()
    rep = evaluate_safety(model, tok, config=ecfg, model_name=label, progress=False, device=device, output_dir=tmp)
    dt = time.perf_counter() - t
    folder = tmp / _safe_name(label)
    outcomes: dict[str, dict[str, bool]] = {"unsafe": {}, "refusal": {}, "utility": {}}
    for line in (folder / "judgements.jsonl").read_text(encoding="utf-8").splitlines():
        j = json.loads(line)
        if "unsafe" in j and str(j["id"]).startswith("harmful/none/"):
            outcomes["unsafe"][j["id"]] = bool(j["unsafe"])
        elif "refusal" in j:
            outcomes["refusal"][j["id"]] = bool(j["refusal"])
    if "utility" in sets and ecfg.utility_metric in ("exact_match", "number"):
        refs = {it.id: it.reference or "" for it in sets["utility"]}
        mode = "number" if ecfg.utility_metric == "number" else "normalized"
        for line in (folder / "generations.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if r.get("set") == "utility":
                outcomes["utility"][str(r["id"])] = exact_match(r["response"], refs[str(r["item"])], mode=mode)
    return Probe(0.0, rep.unsafe_rate, rep.over_refusal, rep.utility, dt, {"eval_seconds": dt}, outcomes)


def calibrate(
    config: SafetyMergeConfig,
    calibration: CalibrationConfig | dict[str, Any] | None = None,
    *,
    progress: bool = True,
    on_probe: Callable[[Probe], None] | None = None,
) -> CalibrationResult:
    """Find the smallest scale of `config.method` that meets the calibration target (no output).

    `on_probe` is called after each probe (the CLI prints the curve as it grows).
    """
    from ..eval.suite import SafetyEvalConfig

    cal = CalibrationConfig.from_dict(calibration if calibration is not None else config.calibration)
    t0 = time.perf_counter()
    sets = calibration_prompts(cal)
    warn_resolution(cal, sets, "calibration")
    scaled_name = cal.scale_for(config.method)[0]
    sm = ScaledMerge(config, scaled_name, progress=progress)
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(sm.close)
        parameter, low, high, integer = cal.scale_for(config.method, num_matrices=sum(1 for n in sm.names if sm.delta[n].ndim == 2))
        model, tok, state = sm.load_model()
        original = {n: state[n].detach().clone() for n in sm.names}
        seconds["prepare"] = time.perf_counter() - t0
        ecfg = SafetyEvalConfig(
            harmful=sets["harmful"], harmful_eval_size=None, benign=sets["benign"], utility=sets.get("utility"),
            utility_metric=cal.utility_metric, judge=cal.judge, max_new_tokens=cal.max_new_tokens,
            batch_size=cal.batch_size, data_dir=cal.data_dir, **generation_options(cal),
        )

        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-safety-calibration-"))

        def evaluate(label: str) -> Probe:
            return evaluate_probe(model, tok, ecfg, label, Path(tmp), sets, device=config.device)

        baseline = evaluate("task model")

        def probe(scale: float) -> Probe:
            t = time.perf_counter()
            merged, summary = sm.merged(scale)
            with torch.no_grad():
                for n, v in merged.items():
                    state[n].copy_(v)
            p = evaluate(f"{parameter}={scale:.4g}")
            p.scale, p.seconds = scale, time.perf_counter() - t
            p.extra.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
            if on_probe is not None:
                on_probe(p)
            return p

        res = search_scale(probe, low, high, target=cal.target(), max_probes=cal.max_probes, integer=integer,
                           baseline=baseline)
        with torch.no_grad():
            for n, v in original.items():
                state[n].copy_(v)
        seconds["probes"] = sum(p.seconds for p in res.probes)
        seconds["probe_evaluation"] = sum(float(p.extra.get("eval_seconds", 0.0)) for p in res.probes)
        seconds["baseline"] = baseline.seconds
        seconds["total"] = time.perf_counter() - t0
        final_method = sm.final_method(res.chosen.scale)
    side = "train side of the report's 50/50 split" if cal.holdout_split else "held out from every report"
    prompts = {k: {"source": v.source, "n": len(v.items), "side": side} for k, v in sets.items()}
    return CalibrationResult(config.method, parameter, res, baseline, cal, prompts, seconds, final_method)


def merge_calibrated(
    config: SafetyMergeConfig,
    *,
    output_dir: str | Path | None = None,
    progress: bool = True,
    on_probe: Callable[[Probe], None] | None = None,
) -> tuple[Any, CalibrationResult]:
    """`calibrate`, then merge once (streaming, as `merge`) at the chosen scale, with the
    calibration in the model card, `merge_report.json` and `calibration.png`."""
    from ..merge import merge

    if config.calibration is None:
        raise ConfigError("merge_calibrated needs a `calibration:` section in the config (or use --calibrate)")
    out = output_dir if output_dir is not None else config.output_dir
    if out is None:
        raise ConfigError("no output folder: set `output_dir` in the config or pass --out")
    from ..io.output import check_output_dir

    check_output_dir(out, config.overwrite, inputs=[config.task_model, config.task_adapter, config.task_reference,
                                                    config.safety_vector])
    result = calibrate(config, progress=progress, on_probe=on_probe)
    if not result.search.feasible and not result.config.allow_constraint_violation:
        raise CalibrationError(f"calibration of {config.method}: {result.message()}; nothing written. Relax the "
                               "constraints (max_over_refusal_increase, min_utility, max_utility_drop, confidence) or "
                               "set allow_constraint_violation: true to merge the least violating setting anyway")
    final = with_parameter(config, result.parameter, result.value)

    def finalize(folder: Path) -> list[str]:
        return write_calibration(folder, result)

    t = time.perf_counter()
    merged = merge(final, output_dir=out, progress=progress, finalize=finalize, method_instance=result.final_method)
    result.seconds["final_merge"] = time.perf_counter() - t
    return merged, result


def write_calibration(folder: Path, result: CalibrationResult) -> list[str]:
    """Add the calibration to a merged folder (before it is moved into place)."""
    files = []
    report = folder / "merge_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        data["calibration"] = result.to_dict()
        report.write_text(json.dumps(data, indent=2) + "\n")
    plot = _plot(result, folder / "calibration.png")
    if plot:
        files.append("calibration.png")
    card = folder / "README.md"
    if card.is_file():
        card.write_text(card.read_text().rstrip() + "\n\n" + calibration_section(result, plot=bool(plot)) + "\n")
    return files


def calibration_section(result: CalibrationResult, plot: bool = False) -> str:
    t = result.config
    b = result.baseline
    n = result.search.chosen.unsafe.n
    half = (result.search.chosen.unsafe.high - result.search.chosen.unsafe.low) / 2
    used = ", ".join(f"{k}: {v['n']} from {v['source']}" for k, v in result.prompts.items())
    lines = [
        "## Calibration",
        "",
        f"`{result.parameter}` was chosen by calibration against the target: unsafe rate <= {t.max_unsafe:.3f}, "
        f"over-refusal at most {t.max_over_refusal_increase:.3f} above the unpatched task model "
        f"({_fmt(b.over_refusal)})" + (f", utility >= {t.min_utility:.3f}" if t.min_utility is not None else "") + ".",
        f"Result: {result.message()}.",
        "",
        result.table(),
        "",
        f"Calibration prompts ({used}) are "
        + ("the train sides of the seeded 50/50 splits whose other sides the evaluation reports on"
           if t.holdout_split else "held out from every training and evaluation set")
        + "; judge: "
        f"`{t.judge}`; greedy, {t.max_new_tokens} new tokens.",
        f"Caveat: a rate met on n = {n} calibration prompts holds on new prompts only up to its interval "
        f"(here +-{half:.3f} at 95%); measure the patched model on held-out prompts (`hf-safety-merge eval`).",
    ]
    if plot:
        lines += ["", "![calibration curve](calibration.png)"]
    return "\n".join(lines)


def plot_curve(ax: Any, probes: list[Probe], parameter: str, max_unsafe: float, chosen: float, **style: Any) -> None:
    """Unsafe rate, over-refusal and utility (with 95% intervals) against the scale on `ax`, the
    unsafe target and the chosen scale marked (the calibration and repair figures)."""
    ps = sorted(probes, key=lambda p: p.scale)
    xs = [p.scale for p in ps]
    for key, label in (("unsafe", "unsafe rate"), ("over_refusal", "over-refusal"), ("utility", "utility")):
        rs = [getattr(p, key) for p in ps]
        if not rs or any(r is None for r in rs):
            continue
        ax.errorbar(xs, [r.value for r in rs], yerr=[[r.value - r.low for r in rs], [r.high - r.value for r in rs]],
                    marker="o", capsize=style.get("capsize", 3), ms=style.get("ms", 6), label=label)
    ax.axhline(max_unsafe, ls="--", lw=0.8, color="grey")
    ax.axvline(chosen, ls=":", lw=1, color="black")
    if parameter != "num_proj_layers" and xs and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(parameter)
    ax.set_ylim(-0.02, 1.02)


def _plot(result: CalibrationResult, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    plot_curve(ax, result.search.probes, result.parameter, result.config.max_unsafe, result.value)
    ax.legend(fontsize=8)
    ax.set_title(f"calibration of {result.method} ({'target met' if result.met else 'target missed'})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
