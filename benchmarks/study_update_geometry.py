"""Where do the LoRA updates of a safety-transfer study go, relative to the alignment direction?

For every LoRA adapter in a study folder (the plain fine-tunes `ft-lora-*` and the AsFT runs
`asft-lora-*`), and every adapted matrix, with `V = W_aligned - W_base` (the AsFT anchor) and
`D = (alpha / r) B A` (the update):

- `cos(D, V)`: Frobenius cosine; negative = the update undoes the alignment step;
- `rank-8 share`: share of `||D||^2` inside the span of V's top-8 left singular vectors
  (the in-basin part under AsFT's `topk` projector);
- `off-basin`: `||(I - C) D|| / ||D||` with Safe LoRA's `C = V V^T / ||V||_F` (AsFT's default).

Aggregates are norm-weighted over all adapted matrices. Used for the AsFT discussion in
docs/study.md:

    python benchmarks/study_update_geometry.py /tmp/study/full --out benchmarks/results/safety_transfer/first_study/update_geometry.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open


def _weights(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = f
    return out


def _get(index: dict[str, Path], key: str) -> torch.Tensor:
    with safe_open(index[key], "pt") as h:
        return h.get_tensor(key).double()


def analyse(
    adapter: Path, aligned: dict[str, Path], base: dict[str, Path], k: int = 8
) -> dict[str, object]:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    rows = []
    with safe_open(adapter / "adapter_model.safetensors", "pt") as h:
        keys = [x for x in h.keys() if x.endswith("lora_A.weight")]  # noqa: SIM118
        for ka in keys:
            module = ka.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a = h.get_tensor(ka).double()
            b = h.get_tensor(ka.replace("lora_A", "lora_B")).double()
            d = scale * b @ a
            wk = module + ".weight"
            v = _get(aligned, wk) - _get(base, wk)
            vn = v.norm()
            cd = v @ (v.T @ d) / vn
            u = torch.linalg.svd(v, full_matrices=False).U[:, :k]
            in_k = (u.T @ d).norm() ** 2
            rows.append(
                {
                    "module": module,
                    "d_norm": float(d.norm()),
                    "v_norm": float(vn),
                    "cos_d_v": float((d * v).sum() / (d.norm() * vn)),
                    "rank_k_share": float(in_k / d.norm() ** 2),
                    "off_basin": float((d - cd).norm() / d.norm()),
                }
            )
    w = torch.tensor([r["d_norm"] ** 2 for r in rows], dtype=torch.float64)
    w = w / w.sum()

    def avg(name: str) -> float:
        return float((w * torch.tensor([r[name] for r in rows], dtype=torch.float64)).sum())

    return {
        "adapter": adapter.name,
        "modules": len(rows),
        "update_norm": float(sum(r["d_norm"] ** 2 for r in rows) ** 0.5),
        "cos_d_v": avg("cos_d_v"),
        "rank_k_share": avg("rank_k_share"),
        "off_basin": avg("off_basin"),
        "per_module": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "study", type=Path, help="a study output folder (with aligned/ and LoRA adapter folders)"
    )
    p.add_argument(
        "--base", type=Path, help="the unaligned base (default: from the AsFT anchors' metadata)"
    )
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    base = a.base
    if base is None:
        for f in sorted(a.study.glob("asft_anchors_*.safetensors")):
            with safe_open(f, "pt") as h:
                base = Path(json.loads((h.metadata() or {})["meta"])["base"])
            break
    if base is None:
        p.error("no AsFT anchors in the study folder: give --base")
    aligned, basew = _weights(a.study / "aligned"), _weights(base)
    results = []
    for ad in sorted(a.study.iterdir()):
        if (ad / "adapter_config.json").is_file() and "+" not in ad.name:
            results.append(analyse(ad, aligned, basew, a.k))
    print(
        f"| adapter | ||update||_F | cos(update, V) | share in V's top-{a.k} | off-basin (Safe LoRA C) |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['adapter']} | {r['update_norm']:.3f} | {r['cos_d_v']:+.3f} | {r['rank_k_share']:.3f} | {r['off_basin']:.3f} |"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps({"study": str(a.study), "k": a.k, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
