"""Regime measurements the study reports before judging a method: the alignment direction's
geometry (AsFT's anchors) and each merge's ``||tau|| / ||Delta_s||`` and alpha (EnchTable's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def alignment_geometry(vector_dir: Path, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> dict[str, Any]:
    """Per targeted matrix of ``V = W_aligned - W_base``: ``||V||_F`` and the top eigenvalue of
    ``C = V V^T / ||V||_F``, which is ``sigma_1(V)^2 / ||V||_F`` (AsFT, Safe LoRA). The penalty
    ``||(I - C) B A||`` is a projection only where that eigenvalue is near 1; far below, it is
    weight decay."""
    import torch
    from safetensors import safe_open

    per: dict[str, dict[str, float]] = {}
    for f in sorted(vector_dir.glob("*.safetensors")):
        if f.name.startswith("subspace"):
            continue
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                if not any(f".{m}." in k for m in modules) or not k.endswith("weight"):
                    continue
                v = fh.get_tensor(k).double()
                fro = float(torch.linalg.matrix_norm(v))
                s1 = float(torch.linalg.matrix_norm(v, ord=2))
                per[k] = {"fro": fro, "top_eig_C": s1 * s1 / fro if fro > 0 else 0.0}
    eig: list[float] = sorted(p["top_eig_C"] for p in per.values())
    fros: list[float] = sorted(p["fro"] for p in per.values())
    n = len(eig)
    return {
        "modules": list(modules), "n": n, "per_matrix": per,
        "fro_min": fros[0] if n else None, "fro_median": fros[n // 2] if n else None, "fro_max": fros[-1] if n else None,
        "top_eig_min": eig[0] if n else None, "top_eig_median": eig[n // 2] if n else None, "top_eig_max": eig[-1] if n else None,
        "share_top_eig_ge_0.5": sum(e >= 0.5 for e in eig) / n if n else None,
    }


def merge_regime(model_dir: Path) -> dict[str, Any]:
    """alpha, ``||tau||``, ``||Delta_s||`` and their ratio from a merge's ``merge_report.json``."""
    p = model_dir / "merge_report.json"
    if not p.is_file():
        return {}
    rep = json.loads(p.read_text())
    s = rep.get("summary", {})
    out: dict[str, Any] = {"method": rep.get("method"), "parameters": rep.get("parameters")}
    for k in ("alpha", "tau_norm", "safety_vector_norm", "w_mean", "w_min", "w_max", "threshold_used", "projected"):
        if s.get(k) is not None:
            out[k] = s[k]
    if s.get("tau_norm") and s.get("safety_vector_norm"):
        out["ratio"] = s["tau_norm"] / s["safety_vector_norm"]
    cal = rep.get("calibration")
    if cal:
        out["calibration"] = {k: cal.get(k) for k in ("chosen", "beta", "met", "message") if k in cal}
    return out
