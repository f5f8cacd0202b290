"""One merge config run by two revisions of this library, side by side on the same machine:
wall time, peak RSS, and how far apart the two merges' results are (alpha, per-matrix w, and the
largest difference between the written tensors).

    python benchmarks/bench_merge_revisions.py CONFIG.yaml --old 50e88be [--new WORKTREE_OR_HEAD]

The old revision is checked out into a temporary git worktree and imported through PYTHONPATH
(from a neutral working directory, so `python -m` cannot pick up this checkout); both runs use
this interpreter and its installed dependencies. Each run writes its own output folder (the
config's `output_dir` is replaced). Results go to `benchmarks/results/bench_merge_revisions_<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge import _peak_wrapper  # noqa: E402


def _run(src: Path, cfg: dict, out: Path, work: Path) -> dict:
    c = work / f"{out.name}.json"
    c.write_text(json.dumps({**cfg, "output_dir": str(out), "overwrite": True}))
    env = {**os.environ, "PYTHONPATH": str(src)}
    r = subprocess.run(_peak_wrapper([sys.executable, "-m", "hf_safety_merge.cli", "merge", str(c), "--no-progress"]),
                       capture_output=True, text=True, env=env, cwd=work)
    res = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    if res["rc"] != 0:
        raise RuntimeError(r.stdout[-2000:] + r.stderr[-3000:])
    return {"seconds": res["wall"], "peak_rss": res["rss"]}


def _max_tensor_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    worst = 0.0
    for fa in sorted(a.glob("model*.safetensors")):
        with safe_open(fa, "pt") as ha, safe_open(b / fa.name, "pt") as hb:
            for k in ha.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                worst = max(worst, float((ha.get_tensor(k).double() - hb.get_tensor(k).double()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--old", required=True, help="git revision of the baseline")
    ap.add_argument("--name", default=None, help="results file suffix (default: the config's stem)")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    import yaml

    cfg = yaml.safe_load(Path(a.config).read_text())
    repo = HERE.parent
    work = Path(tempfile.mkdtemp(prefix="bench-revisions-"))
    old_src = work / "old-src"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(old_src), a.old], check=True)
    try:
        res = {"old": _run(old_src, cfg, work / "out-old", work), "new": _run(repo, cfg, work / "out-new", work)}
        rep = {k: json.loads((work / f"out-{k}" / "merge_report.json").read_text()) for k in ("old", "new")}
        ws = [abs(rep["old"]["tensors"][n]["w"] - rep["new"]["tensors"][n]["w"])
              for n in rep["old"]["tensors"] if "w" in rep["old"]["tensors"][n]]
        diff = {"alpha_old": rep["old"]["summary"].get("alpha"), "alpha_new": rep["new"]["summary"].get("alpha"),
                "matrices_with_w": len(ws), "max_abs_w_difference": max(ws, default=0.0),
                "max_abs_tensor_difference": _max_tensor_diff(work / "out-old", work / "out-new")}
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(old_src)], check=False)
    new_rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\n| revision | seconds | peak RSS MiB |\n| --- | --- | --- |\n"
          f"| {a.old} (old) | {res['old']['seconds']:.2f} | {res['old']['peak_rss'] / 2**20:.0f} |\n"
          f"| {new_rev} + working tree (new) | {res['new']['seconds']:.2f} | {res['new']['peak_rss'] / 2**20:.0f} |\n")
    print(f"speed-up {res['old']['seconds'] / res['new']['seconds']:.2f}x; {json.dumps(diff)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = a.name or Path(a.config).stem
    payload = {"config": cfg, "old_revision": a.old, "new_revision": new_rev, "results": res, "difference": diff,
               "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(), "command": " ".join(sys.argv)}
    (out / f"bench_merge_revisions_{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / f'bench_merge_revisions_{name}.json'}")


if __name__ == "__main__":
    main()
