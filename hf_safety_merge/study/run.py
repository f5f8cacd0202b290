"""The study's plan and driver: which models it builds, in which order, then evaluation and report."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .data import load_study_data
from .diagnostics import alignment_geometry
from .row import Row
from .stages import Stages


@dataclass
class Built:
    """What the headline stages built, which the sweep stages reuse."""

    base: Path
    aligned: Path
    align_vec: Path | None
    broken: dict[str, Row]
    vectors: dict[str, Path]
    deferred: list[tuple[Row, Callable[[], Row]]]  # headline-plan rows not in ``headline_rows``


class _Plan:
    """Rows in plan order: a row named in ``headline_rows`` (or every row, when it is empty) is
    built now and evaluated in full; any other is demoted to the sweep evaluation and built after
    the headline rows are reported."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.keep = set(cfg.headline_rows)
        self.rows: list[Row] = []
        self.deferred: list[tuple[Row, Callable[[], Row]]] = []

    def headline(self, name: str) -> bool:
        return not self.keep or name in self.keep

    def add(self, row: Row, build: Callable[[], Row] | None = None) -> None:
        """`row` as planned; `build` makes it (returns the built row), or None when it exists."""
        if not self.headline(row.name):
            row.group = "sweep"
            if build is not None:
                self.deferred.append((row, build))
                return
        self.rows.append(build() if build is not None else row)


def build_headline(st: Stages) -> tuple[list[Row], dict[str, Any], Built]:
    """Run every headline training and merge stage (cached); the rows to evaluate."""
    import torch

    c, w = st.cfg, st.work
    if c.threads:
        torch.set_num_threads(c.threads)
    st.log(f"safety-transfer study in {w} ({c.device}, {torch.get_num_threads()} threads)")
    diag: dict[str, Any] = {}
    base = st.base()
    aligned = st.align(base)
    plan = _Plan(c)
    plan.add(Row("base", base))
    plan.add(Row("aligned", aligned))
    m = set(c.methods)
    align_vec = None
    if m & {"safe_lora", "asft"} or ("repair" in m and "safe_lora" in c.repair_methods):
        align_vec = st.alignment_vector(aligned, base)
        diag["alignment"] = alignment_geometry(align_vec, tuple(c.lora_target_modules))
        g = diag["alignment"]
        if g["n"]:
            st.log(f"      alignment direction on {g['n']} {'/'.join(c.lora_target_modules)} matrices: ||V||_F median "
                   f"{g['fro_median']:.3f}, top eigenvalue of C median {g['top_eig_median']:.3f}, "
                   f"share >= 0.5: {g['share_top_eig_ge_0.5']:.2f}")
    broken: dict[str, Row] = {}
    if "full" in c.break_modes:
        ff = c.harmful_frac if c.full_harmful_frac is None else c.full_harmful_frac
        broken["full"] = Row("ft-full", st.break_full(aligned), setting=f"full fine-tune, {ff:.0%} harmful rows")
    if "lora" in c.break_modes:
        broken["lora"] = Row("ft-lora", aligned, st.lora_run("ft-lora", base, aligned, 0.0),
                             setting=f"LoRA fine-tune, {c.harmful_frac:.0%} harmful rows")
    for b in broken.values():
        plan.add(b)
    vectors: dict[str, Path] = {str(v): st.distill(aligned, str(v)) for v in c.distill_variants}
    for b in broken.values():
        t, lora = _task(b)
        pre = b.name
        if "enchtable" in m:
            for v, vec in vectors.items():
                for beta in c.enchtable_betas:
                    tag = "" if beta == 0.1 else f"-beta{beta:g}"
                    row = Row(f"{pre}+enchtable-{v}{tag}", t, None, pre, "enchtable", setting=f"{v}, beta {beta:g}")
                    plan.add(row, lambda row=row, beta=beta, vec=vec, t=t, lora=lora: st.merge(  # type: ignore[misc]
                        row, "enchtable", {"beta": beta}, vec, t, lora, aligned))
        if "repair" in m:
            row = Row(f"{pre}+repair", t, None, pre, "repair", setting="method x scale by repair")
            vec_r = align_vec
            plan.add(row, lambda row=row, t=t, lora=lora, vec_r=vec_r: st.repair(  # type: ignore[misc]
                row, vectors, vec_r, t, lora, aligned))
        if "calibrated" in m:
            row = Row(f"{pre}+enchtable-{c.sweep_variant}-calibrated", t, None, pre, "calibrated",
                      setting=f"{c.sweep_variant}, beta by calibration")
            plan.add(row, lambda row=row, t=t, lora=lora: st.calibrated(row, vectors[c.sweep_variant], t, lora, aligned))  # type: ignore[misc]
        if "resta" in m:
            for beta in c.resta_betas:
                row = Row(f"{pre}+resta" + ("" if beta == 1 else f"-beta{beta:g}"), t, None, pre, "resta", setting=f"beta {beta:g}")
                plan.add(row, lambda row=row, beta=beta, t=t, lora=lora: st.merge(  # type: ignore[misc]
                    row, "task_arithmetic", {"beta": beta}, vectors[c.sweep_variant], t, lora, aligned))
        if "safe_lora" in m and align_vec is not None:
            row = Row(f"{pre}+safe_lora", t, None, pre, "safe_lora", setting="10 matrices (default)")
            vec_a = align_vec
            plan.add(row, lambda row=row, t=t, lora=lora, vec_a=vec_a: st.merge(  # type: ignore[misc]
                row, "safe_lora", {}, vec_a, t, lora, aligned))
    if "asft" in m:
        for lam in c.asft_lambdas:
            name = "asft" + ("" if lam == 1 else f"-lam{lam:g}")
            row = Row(name, aligned, None, "ft-lora", "asft", setting=f"lambda {lam:g}")
            plan.add(row, lambda row=row, name=name, lam=lam: _with_adapter(row, st.lora_run(name, base, aligned, lam)))  # type: ignore[misc]
    if "safekey" in m:
        for s in c.safekey_settings:
            h, q = (float(x) for x in str(s).split(":"))
            name = "safekey" if (h, q) == (0.2, 0.2) else ("sft-reasoning" if (h, q) == (0, 0) else f"safekey-head{h:g}-qmm{q:g}")
            row = Row(name, aligned, None, None, "safekey" if (h or q) else "sft", setting=f"head {h:g}, QMM {q:g}")
            plan.add(row, lambda row=row, h=h, q=q, name=name: _with_model(row, st.safekey(aligned, h, q, w / name)))  # type: ignore[misc]
    return plan.rows, diag, Built(base, aligned, align_vec, broken, vectors, plan.deferred)


def _with_adapter(row: Row, adapter: Path) -> Row:
    row.adapter = adapter
    return row


def _with_model(row: Row, model: Path) -> Row:
    row.model = model
    return row


def _task(b: Row) -> tuple[Path, bool]:
    return (b.adapter if b.adapter is not None else b.model), b.adapter is not None


def plan_sweeps(st: Stages, built: Built) -> list[tuple[Row, Callable[[], Row]]]:
    """The sweep rows (the smaller evaluation) and how to build each, in the order they run: the
    headline-plan rows that ``headline_rows`` demoted among them; per fine-tune, the cheap merges
    first (EnchTable's beta and RESTA's, then Safe LoRA on every matrix, TIES, DARE), then the
    calibrated repair (it generates while it searches beta); the AsFT lambda sweep (two training
    runs) last. The caller builds and evaluates one row at a time, so results land as they run."""
    c = st.cfg
    m = set(c.methods)
    base, aligned, align_vec, vectors = built.base, built.aligned, built.align_vec, built.vectors
    order = {name: i for i, name in enumerate(built.broken)}
    ranked: list[tuple[tuple[int, int], Row, Callable[[], Row]]] = []

    def rank(row: Row) -> tuple[int, int]:
        if row.repairs is None or row.method == "asft":
            return (-1, 0) if row.method != "asft" else (len(order), 0)
        kind = {"enchtable": 0, "resta": 0, "calibrated": 2}.get(row.method or "", 1)
        return next(i for n, i in order.items() if built.broken[n].name == row.repairs), kind

    def add(row: Row, build: Callable[[], Row]) -> None:
        ranked.append((rank(row), row, build))

    for row, build in built.deferred:
        add(row, build)
    for b in built.broken.values():
        t, lora = _task(b)
        pre = b.name
        if "enchtable" in m:
            for beta in c.sweep_enchtable_betas:
                v = c.sweep_variant
                row = Row(f"{pre}+enchtable-{v}-beta{beta:g}", t, None, pre, "enchtable", "sweep", f"{v}, beta {beta:g}")
                add(row, lambda row=row, beta=beta, v=v, t=t, lora=lora: st.merge(  # type: ignore[misc]
                    row, "enchtable", {"beta": beta}, vectors[v], t, lora, aligned))
        if "resta" in m:
            for beta in c.sweep_resta_betas:
                row = Row(f"{pre}+resta-beta{beta:g}", t, None, pre, "resta", "sweep", f"beta {beta:g}")
                add(row, lambda row=row, beta=beta, t=t, lora=lora: st.merge(  # type: ignore[misc]
                    row, "task_arithmetic", {"beta": beta}, vectors[c.sweep_variant], t, lora, aligned))
        if "safe_lora" in m and c.safe_lora_sweep and align_vec is not None:
            row = Row(f"{pre}+safe_lora-all", t, None, pre, "safe_lora", "sweep", "every matrix")
            vec_a = align_vec
            add(row, lambda row=row, t=t, lora=lora, vec_a=vec_a: st.merge(  # type: ignore[misc]
                row, "safe_lora", {"select": "threshold", "threshold": 1.0}, vec_a, t, lora, aligned))
        for meth in ("ties", "dare"):
            if meth in m:
                row = Row(f"{pre}+{meth}", t, None, pre, meth, "sweep", "defaults")
                add(row, lambda row=row, meth=meth, t=t, lora=lora: st.merge(  # type: ignore[misc]
                    row, meth, {}, vectors[c.sweep_variant], t, lora, aligned))
    if "asft" in m:
        for lam in c.sweep_asft_lambdas:
            name = f"asft-lam{lam:g}"
            row = Row(name, aligned, None, "ft-lora", "asft", "sweep", f"lambda {lam:g}")
            add(row, lambda row=row, name=name, lam=lam: _with_adapter(row, st.lora_run(name, base, aligned, lam)))  # type: ignore[misc]
    ranked.sort(key=lambda x: x[0])  # stable: plan order within a rank
    return [(row, build) for _, row, build in ranked]


def build_sweeps(st: Stages, built: Built) -> list[Row]:
    """Build every sweep row (see `plan_sweeps`) and return them."""
    return [build() for _, build in plan_sweeps(st, built)]


class _DryStages:
    """Stands in for `Stages` to list the plan's row names without building anything."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg, self.work = cfg, Path("<work>")

    def log(self, _msg: str) -> None:
        pass

    def merge(self, row: Row, *_a: Any, **_k: Any) -> Row:
        return row

    calibrated = merge
    repair = merge

    def __getattr__(self, name: str) -> Callable[..., Path]:
        return lambda *_a, **_k: Path(f"<{name}>")


def planned_rows(cfg: StudyConfig) -> tuple[list[str], list[str]]:
    """The names of the headline plan's rows and of the sweep rows, without building anything."""
    import dataclasses

    dry: Any = _DryStages(dataclasses.replace(cfg, headline_rows=()))
    rows, _, built = build_headline(dry)
    return [r.name for r in rows], [r.name for r in build_sweeps(dry, built)]


def _cached_only(stage: Callable[..., Path]) -> Callable[..., Path]:
    """`Stages.stage` that refuses to run a stage (``report_only``)."""
    def run(name: str, out: Path, fn: Callable[[], Any]) -> Path:
        if not (out / ".done").is_file():
            from ..errors import ConfigError

            raise ConfigError(f"report_only: stage {name!r} is not finished in {out.parent} (run the study to build it)")
        return stage(name, out, fn)

    return run


def run_study(cfg: StudyConfig, work: str | os.PathLike[str], *, evaluate: bool = True, report_only: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole study (cached per stage in `work`) and return the results payload
    (with ``evaluate=False``: build every model and return the plan; with ``report_only``:
    rewrite the report from the rows already evaluated in `work`, building and evaluating nothing
    new, e.g. after a run was stopped during the sweeps)."""
    from ..eval.engine import close_shared_engines

    try:
        return _run_study(cfg, work, evaluate=evaluate, report_only=report_only, log=log)
    finally:
        close_shared_engines()  # a managed vLLM server (evaluation, repair probes) stops with the study


def _run_study(cfg: StudyConfig, work: str | os.PathLike[str], *, evaluate: bool, report_only: bool,
               log: Callable[[str], None]) -> dict[str, Any]:
    cfg.validate()
    if cfg.headline_rows:  # a typo here would silently demote a decisive row: fail before any work
        from ..errors import ConfigError, did_you_mean

        names, _ = planned_rows(cfg)
        for n in cfg.headline_rows:
            if n not in names:
                raise ConfigError(f"headline_rows entry {n!r} is not a row of the headline plan {names}" + did_you_mean(n, names))
    w = Path(work)
    if report_only and not (w / "aligned" / ".done").is_file():
        from ..errors import ConfigError

        raise ConfigError(f"report_only: {w} holds no finished study stages (no aligned/.done)")
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_study_data(cfg)
    st = Stages(cfg, w, data, log=log)
    if report_only:
        st.stage = _cached_only(st.stage)  # type: ignore[method-assign]
    rows, diag, built = build_headline(st)
    (w / "diagnostics.json").write_text(json.dumps(diag, indent=1))
    from .evaluate import evaluate_rows
    from .report import write_report

    head = [r for r in rows if r.group == "headline"]
    planned = [(r, lambda r=r: r) for r in rows if r.group != "headline"] + plan_sweeps(st, built)
    if not evaluate:
        sweep = [build() for _, build in planned]
        return {"rows": [r.name for r in head + sweep], "diagnostics": diag, "timings": st.timings}
    from .evaluate import EvalPool, eval_workers, outcomes_file

    if report_only:  # nothing is evaluated: a row without its outcomes (e.g. a run still going) is left out
        missing = [r.name for r in head if not outcomes_file(w, r.name).is_file()]
        if missing:
            log(f"  report_only: not evaluated yet, left out of the report: {', '.join(missing)}")
        head = [r for r in head if r.name not in missing]
        planned = [(r, b) for r, b in planned if outcomes_file(w, r.name).is_file()]
    k = 1 if report_only else eval_workers(cfg)
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(EvalPool(st, k)) if k > 1 else None
        # the headline rows are evaluated and reported before any sweep stage runs
        results: dict[str, Any] = evaluate_rows(st, head, pool=pool)
        write_report(st, head, results, diag, total_seconds=time.perf_counter() - t0, pending="sweep rows")
        judge = None
        if pool is None:
            from ..eval.judges import get_judge

            judge = get_judge(cfg.judge)
        done: list[Row] = []
        for i in range(0, len(planned), k):  # k rows at a time: each group lands in the report as it runs
            group = [build() for _, build in planned[i:i + k]]
            results.update(evaluate_rows(st, group, judge=judge, pool=pool))
            done += group
            if i + k < len(planned):
                write_report(st, head + done, results, diag, total_seconds=time.perf_counter() - t0,
                             pending=f"{len(planned) - i - k} sweep rows")
    return write_report(st, head + done, results, diag, total_seconds=time.perf_counter() - t0)
