"""The study's plan and driver: which models it builds, in which order, then evaluation and report."""

from __future__ import annotations

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
from .stages import Row, Stages


@dataclass
class Built:
    """What the headline stages built, which the sweep stages reuse."""

    base: Path
    aligned: Path
    align_vec: Path | None
    broken: dict[str, Row]
    vectors: dict[str, Path]


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
    rows = [Row("base", base), Row("aligned", aligned)]
    m = set(c.methods)
    align_vec = None
    if m & {"safe_lora", "asft"}:
        align_vec = st.alignment_vector(aligned, base)
        diag["alignment"] = alignment_geometry(align_vec, tuple(c.lora_target_modules))
        g = diag["alignment"]
        st.log(f"      alignment direction on {g['n']} {'/'.join(c.lora_target_modules)} matrices: ||V||_F median "
               f"{g['fro_median']:.3f}, top eigenvalue of C median {g['top_eig_median']:.3f}, "
               f"share >= 0.5: {g['share_top_eig_ge_0.5']:.2f}")
    broken: dict[str, Row] = {}
    if "full" in c.break_modes:
        broken["full"] = Row("ft-full", st.break_full(aligned))
    if "lora" in c.break_modes:
        broken["lora"] = Row("ft-lora", aligned, st.lora_run("ft-lora", base, aligned, 0.0))
    rows += broken.values()
    vectors: dict[str, Path] = {str(v): st.distill(aligned, str(v)) for v in c.distill_variants}
    for b in broken.values():
        t, lora = _task(b)
        pre = b.name
        if "enchtable" in m:
            for v, vec in vectors.items():
                for beta in c.enchtable_betas:
                    tag = "" if beta == 0.1 else f"-beta{beta:g}"
                    rows.append(st.merge(Row(f"{pre}+enchtable-{v}{tag}", t, None, pre, "enchtable", setting=f"{v}, beta {beta:g}"),
                                         "enchtable", {"beta": beta}, vec, t, lora, aligned))
        if "calibrated" in m:
            rows.append(st.calibrated(Row(f"{pre}+enchtable-{c.sweep_variant}-calibrated", t, None, pre, "calibrated",
                                          setting=f"{c.sweep_variant}, beta by calibration"), vectors[c.sweep_variant], t, lora, aligned))
        if "resta" in m:
            for beta in c.resta_betas:
                rows.append(st.merge(Row(f"{pre}+resta" + ("" if beta == 1 else f"-beta{beta:g}"), t, None, pre, "resta", setting=f"beta {beta:g}"),
                                     "task_arithmetic", {"beta": beta}, vectors[c.sweep_variant], t, lora, aligned))
        if "safe_lora" in m and align_vec is not None:
            rows.append(st.merge(Row(f"{pre}+safe_lora", t, None, pre, "safe_lora", setting="10 matrices (default)"),
                                 "safe_lora", {}, align_vec, t, lora, aligned))
    if "asft" in m:
        for lam in c.asft_lambdas:
            name = "asft" + ("" if lam == 1 else f"-lam{lam:g}")
            rows.append(Row(name, aligned, st.lora_run(name, base, aligned, lam), "ft-lora", "asft", setting=f"lambda {lam:g}"))
    if "safekey" in m:
        for s in c.safekey_settings:
            h, q = (float(x) for x in str(s).split(":"))
            name = "safekey" if (h, q) == (0.2, 0.2) else ("sft-reasoning" if (h, q) == (0, 0) else f"safekey-head{h:g}-qmm{q:g}")
            rows.append(Row(name, st.safekey(aligned, h, q, w / name), None, None, "safekey" if (h or q) else "sft",
                            setting=f"head {h:g}, QMM {q:g}"))
    return rows, diag, Built(base, aligned, align_vec, broken, vectors)


def _task(b: Row) -> tuple[Path, bool]:
    return (b.adapter if b.adapter is not None else b.model), b.adapter is not None


def build_sweeps(st: Stages, built: Built) -> list[Row]:
    """The sweep stages (evaluated with the smaller evaluation)."""
    c = st.cfg
    m = set(c.methods)
    base, aligned, align_vec, vectors = built.base, built.aligned, built.align_vec, built.vectors
    sweep: list[Row] = []
    for b in built.broken.values():
        t, lora = _task(b)
        pre = b.name
        if "enchtable" in m:
            for beta in c.sweep_enchtable_betas:
                v = c.sweep_variant
                sweep.append(st.merge(Row(f"{pre}+enchtable-{v}-beta{beta:g}", t, None, pre, "enchtable", "sweep", f"{v}, beta {beta:g}"),
                                      "enchtable", {"beta": beta}, vectors[v], t, lora, aligned))
        if "resta" in m:
            for beta in c.sweep_resta_betas:
                sweep.append(st.merge(Row(f"{pre}+resta-beta{beta:g}", t, None, pre, "resta", "sweep", f"beta {beta:g}"),
                                      "task_arithmetic", {"beta": beta}, vectors[c.sweep_variant], t, lora, aligned))
        if "safe_lora" in m and c.safe_lora_sweep and align_vec is not None:
            sweep.append(st.merge(Row(f"{pre}+safe_lora-all", t, None, pre, "safe_lora", "sweep", "every matrix"),
                                  "safe_lora", {"select": "threshold", "threshold": 1.0}, align_vec, t, lora, aligned))
        for meth in ("ties", "dare"):
            if meth in m:
                sweep.append(st.merge(Row(f"{pre}+{meth}", t, None, pre, meth, "sweep", "defaults"),
                                      meth, {}, vectors[c.sweep_variant], t, lora, aligned))
    if "asft" in m:
        for lam in c.sweep_asft_lambdas:
            name = f"asft-lam{lam:g}"
            sweep.append(Row(name, aligned, st.lora_run(name, base, aligned, lam), "ft-lora", "asft", "sweep", f"lambda {lam:g}"))
    return sweep


def run_study(cfg: StudyConfig, work: str | os.PathLike[str], *, evaluate: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole study (cached per stage in `work`) and return the results payload
    (with ``evaluate=False``: build every model and return the plan)."""
    cfg.validate()
    w = Path(work)
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = load_study_data(cfg)
    st = Stages(cfg, w, data, log=log)
    rows, diag, built = build_headline(st)
    (w / "diagnostics.json").write_text(json.dumps(diag, indent=1))
    from .evaluate import evaluate_rows
    from .report import write_report

    results: dict[str, Any] = {}
    if evaluate:  # the headline rows are evaluated and reported before any sweep stage runs
        results = evaluate_rows(st, rows)
        write_report(st, rows, results, diag, total_seconds=time.perf_counter() - t0, pending="sweep rows")
    sweep = build_sweeps(st, built)
    if not evaluate:
        return {"rows": [r.name for r in rows + sweep], "diagnostics": diag, "timings": st.timings}
    results.update(evaluate_rows(st, sweep))
    return write_report(st, rows + sweep, results, diag, total_seconds=time.perf_counter() - t0)
