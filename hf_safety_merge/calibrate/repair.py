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
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, ConfigError, did_you_mean
from ..eval.prompts import load_prompts, split_prompts
from ..merge.calibration_config import CalibrationConfig
from ..merge.config import SafetyMergeConfig
from ..validation import NonNegativeInt, validate_dataclass
from .probes import ScaledMerge, with_parameter
from .run import _fmt, calibration_prompts, evaluate_probe, generation_options
from .search import Probe, SearchResult, search_scale

#: what `methods` may name (``resta`` is RESTA's name for task arithmetic with a safety vector)
REPAIR_METHODS = ("enchtable", "task_arithmetic", "safe_lora", "ties", "dare")
ALIASES = {"resta": "task_arithmetic"}
LABELS = {"enchtable": "EnchTable", "task_arithmetic": "RESTA", "safe_lora": "Safe LoRA", "ties": "TIES", "dare": "DARE"}


@dataclass
class RepairConfig:
    """What `repair` searches (a YAML/JSON file for `hf-safety-merge repair CONFIG`).

    Attributes:
        task_model / task_adapter / task_reference: the fine-tune to repair, as in a merge config
            (a full fine-tune with its aligned reference, or a base model with a LoRA adapter).
        safety_vectors: EnchTable's distilled vectors (one path or several; EnchTable is searched
            with each, RESTA / TIES / DARE with the first).
        alignment_vector: Safe LoRA's ``W_aligned - W_base`` (optional; without it Safe LoRA is
            skipped with a note).
        methods: the methods to search (default all of ``REPAIR_METHODS``; ``resta`` is an alias).
        parameters: fixed parameters per method (e.g. ``{enchtable: {lam: 5}}``), besides its scale.
        ranges: the search range per method (e.g. ``{enchtable: [0.05, 2]}``; default: the method's
            in ``hf_safety_merge.calibrate.SCALES``).
        calibration: the target, constraints, calibration prompts and probe budget per method
            (:class:`~hf_safety_merge.calibrate.CalibrationConfig`).
        check_harmful / check_benign: prompts of the held-out check of the chosen repair (0: no
            check); taken from the *eval* sides of the calibration sets' splits (the sides reports
            test on), so never from the calibration prompts.
        output_dir / overwrite / device / dtype: as in a merge config.
    """

    task_model: str
    safety_vectors: Sequence[str] | str = ()
    task_adapter: str | None = None
    task_reference: str | None = None
    alignment_vector: str | None = None
    methods: Sequence[str] = REPAIR_METHODS
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranges: dict[str, Sequence[float]] = field(default_factory=dict)
    calibration: dict[str, Any] | CalibrationConfig = field(default_factory=dict)
    check_harmful: NonNegativeInt = 0
    check_benign: NonNegativeInt = 0
    output_dir: str | None = None
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.safety_vectors, str):
            self.safety_vectors = [self.safety_vectors]
        self.safety_vectors = [str(v) for v in self.safety_vectors]
        self.methods = [ALIASES.get(m, m) for m in self.methods]
        validate_dataclass(self, what="repair option")
        for m in self.methods:
            if m not in REPAIR_METHODS:
                raise ConfigError(f"repair method {m!r} is not one of {REPAIR_METHODS} (or 'resta')"
                                  + did_you_mean(m, (*REPAIR_METHODS, *ALIASES)))
        for m in self.parameters:
            if ALIASES.get(m, m) not in REPAIR_METHODS:
                raise ConfigError(f"repair parameters for unknown method {m!r}" + did_you_mean(m, REPAIR_METHODS))
        self.parameters = {ALIASES.get(k, k): dict(v) for k, v in self.parameters.items()}
        for m, r in self.ranges.items():
            if ALIASES.get(m, m) not in REPAIR_METHODS:
                raise ConfigError(f"repair ranges for unknown method {m!r}" + did_you_mean(m, REPAIR_METHODS))
            if len(r) != 2 or not float(r[0]) < float(r[1]):
                raise ConfigError(f"repair ranges[{m!r}] = {list(r)}: expected [low, high] with low < high")
        self.ranges = {ALIASES.get(k, k): (float(v[0]), float(v[1])) for k, v in self.ranges.items()}
        if not self.methods:
            raise ConfigError("repair: `methods` is empty")
        if not self.safety_vectors and set(self.methods) - {"safe_lora"}:
            raise ConfigError(f"repair: methods {sorted(set(self.methods) - {'safe_lora'})} need `safety_vectors`")
        if self.task_adapter is None and self.task_reference is None:
            raise ConfigError("repair: give `task_reference` (the aligned model a full fine-tune started from) or "
                              "`task_adapter` (a LoRA fine-tune of `task_model`)")
        self.calibration = CalibrationConfig.from_dict(self.calibration)
        if (self.check_harmful or self.check_benign) and not self.calibration.holdout_split:
            raise ConfigError("repair: the held-out check (check_harmful / check_benign) needs `calibration.holdout_split: "
                              "true`: its prompts are the eval sides of the calibration sources' splits")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> RepairConfig:
        from ..validation import load_yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"repair config {p} does not exist")
        raw = load_yaml(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of repair options, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in names:
                raise ConfigError(f"{p}: unknown repair option {k!r}{did_you_mean(str(k), names)}")
        if "task_model" not in raw:
            raise ConfigError(f"{p}: missing field 'task_model' (the fine-tune to repair)")
        return cls(**{**raw, **{k: v for k, v in overrides.items() if v is not None}})

    def candidates(self) -> list[tuple[str, str]]:
        """(method, vector) pairs in search order."""
        out: list[tuple[str, str]] = []
        for m in self.methods:
            if m == "enchtable":
                out += [(m, v) for v in self.safety_vectors]
            elif m == "safe_lora":
                if self.alignment_vector is not None:
                    out.append((m, self.alignment_vector))
            else:
                out.append((m, self.safety_vectors[0]))
        return out

    def merge_config(self, method: str, vector: str, output_dir: str | None = None) -> SafetyMergeConfig:
        return SafetyMergeConfig(task_model=self.task_model, task_adapter=self.task_adapter,
                                 task_reference=self.task_reference, safety_vector=vector, method=method,
                                 parameters=dict(self.parameters.get(method, {})), output_dir=output_dir,
                                 overwrite=self.overwrite, device=self.device, dtype=self.dtype)  # type: ignore[arg-type]


@dataclass
class MethodSearch:
    """One method's (and vector's) scale search."""

    method: str
    vector: str
    parameter: str
    search: SearchResult
    final_method: Any = None

    @property
    def label(self) -> str:
        name = LABELS.get(self.method, self.method)
        return f"{name} ({Path(self.vector).name})" if self.method == "enchtable" else name

    def to_dict(self) -> dict[str, Any]:
        s = self.search
        return {"method": self.method, "vector": self.vector, "parameter": self.parameter, "chosen": s.chosen.scale,
                "met": s.met, "feasible": s.feasible, "misses": s.misses, "strategy": s.strategy,
                "message": s.message(self.parameter), "probes": [p.to_dict() for p in s.probes]}


@dataclass
class RepairResult:
    """The whole search, the choice and the held-out check."""

    config: RepairConfig
    searches: list[MethodSearch]
    baseline: Probe
    chosen: MethodSearch | None
    prompts: dict[str, dict[str, Any]]
    check: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    output_dir: Path | None = None

    @property
    def cal(self) -> CalibrationConfig:
        assert isinstance(self.config.calibration, CalibrationConfig)
        return self.config.calibration

    def headline(self) -> str:
        """One line: what to ship and what it does on the calibration (and held-out) prompts."""
        if self.chosen is None:
            return "no repair keeps the constraints: ship nothing from this search (see the curves)"
        c, b = self.chosen.search.chosen, self.baseline
        line = (f"ship {self.chosen.label}, {self.chosen.parameter} = {c.scale:.4g}: unsafe {100 * b.unsafe.value:.0f}% -> "
                f"{100 * c.unsafe.value:.0f}%")
        if c.over_refusal is not None and b.over_refusal is not None:
            line += f", over-refusal {100 * (c.over_refusal.value - b.over_refusal.value):+.0f} pts"
        if c.utility is not None and b.utility is not None:
            line += f", task {100 * (c.utility.value - b.utility.value):+.0f} pts"
        line += " (calibration prompts)"
        if self.check:
            t, r = self.check.get("task model", {}), self.check.get("repaired", {})
            if t and r:
                line += f"; held out: unsafe {100 * t['unsafe']['value']:.0f}% -> {100 * r['unsafe']['value']:.0f}%"
        return line

    def to_dict(self) -> dict[str, Any]:
        t = self.cal
        return {"format": "hf-safety-merge/repair", "version": 1, "headline": self.headline(),
                "chosen": None if self.chosen is None else {"method": self.chosen.method, "vector": self.chosen.vector,
                                                           "parameter": self.chosen.parameter,
                                                           "value": self.chosen.search.chosen.scale,
                                                           "met": self.chosen.search.met},
                "target": dataclasses.asdict(t.target()), "baseline": self.baseline.to_dict(),
                "searches": [s.to_dict() for s in self.searches], "prompts": self.prompts, "check": self.check,
                "judge": t.judge, "seconds": self.seconds, "notes": self.notes}

    def table(self) -> str:
        """The choice per method: one row each, with the task model first."""
        b = self.baseline
        lines = ["| method | scale | unsafe | over-refusal | utility | outcome |", "| --- | --- | --- | --- | --- | --- |",
                 f"| task model (unpatched) | - | {_fmt(b.unsafe)} | {_fmt(b.over_refusal)} | {_fmt(b.utility)} | |"]
        for s in self.searches:
            c = s.search.chosen
            what = "meets the target" if s.search.met else ("best within the constraints" if s.search.feasible
                                                             else "breaks a constraint")
            mark = " **chosen**" if s is self.chosen else ""
            lines.append(f"| {s.label} | {s.parameter} = {c.scale:.4g} | {_fmt(c.unsafe)} | {_fmt(c.over_refusal)} | "
                         f"{_fmt(c.utility)} | {what}{mark} |")
        return "\n".join(lines)


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
    if "safe_lora" in cfg.methods and cfg.alignment_vector is None:
        notes.append("Safe LoRA skipped: no `alignment_vector` (W_aligned - W_base) given")
    t0 = time.perf_counter()
    sets = calibration_prompts(cal)
    seconds: dict[str, float] = {}
    searches: list[MethodSearch] = []
    shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    opened: dict[str, ScaledMerge] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hf-safety-repair-")))
        cands = cfg.candidates()
        if not cands:
            raise ConfigError("repair: nothing to search (Safe LoRA alone needs `alignment_vector`)")

        def open_vector(method: str, vector: str) -> ScaledMerge:
            # one ScaledMerge per vector (EnchTable's terms need it opened for enchtable)
            key = vector if method != "safe_lora" else f"safe_lora:{vector}"
            if key not in opened:
                first = "enchtable" if method != "safe_lora" and "enchtable" in cfg.methods else method
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
            label = LABELS.get(method, method) + (f" ({Path(vector).name})" if method == "enchtable" else "")

            def probe(scale: float, sm: ScaledMerge = sm, method: str = method, parameter: str = parameter,
                      fixed: dict[str, Any] = fixed, label: str = label, i: int = i) -> Probe:
                t = time.perf_counter()
                merged, summary = sm.merged(scale, method, parameter, fixed)
                load(merged)
                p = evaluate_probe(model, tok, ecfg, f"{i}-{method}-{parameter}={scale:.4g}", tmp, sets, device=cfg.device)
                p.scale, p.seconds = scale, time.perf_counter() - t
                p.extra.update({k: v for k, v in summary.items() if isinstance(v, int | float)})
                if on_probe is not None:
                    on_probe(label, p)
                return p

            t = time.perf_counter()
            res = search_scale(probe, low, high, target=cal.target(), max_probes=cal.max_probes, integer=integer,
                               baseline=baseline)
            seconds[f"search {label}"] = time.perf_counter() - t
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
    if chosen.method == "enchtable":
        return sm.final_method(chosen.search.chosen.scale)
    from ..methods.base import build_method

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
