"""The safety monitor's curves of a study's two fine-tunes, read from its work folder as soon as their
training stages are done (the study's own report writes the same section, "When is safety lost?",
when every row has been evaluated; this prints it earlier, from the same files).

    python benchmarks/study_monitor_curves.py --work <study work folder> \
        --out benchmarks/results/safety_transfer/monitor_full

Writes `monitor_curves.md` (the section, with each curve's table), `monitor_curves.png` and
`monitor_curves.json` (the points) into --out, and prints the section.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_safety_merge.monitor.curve import curve_table, plot_curves, read_curve

FINE_TUNES = ("ft-full", "ft-lora")


def section(curves: dict[str, list[dict]], meta: dict[str, dict]) -> str:
    md = ["## When is safety lost? (the fine-tunes, probed while they train)", ""]
    for name, pts in curves.items():
        m = meta.get(name, {})
        probes = m.get("probes", {})
        first = next((p["step"] for p in pts if p.get("eroded")), None)
        md += [f"**{name}** (probes every {m.get('steps')} steps: {probes.get('harmful')} harmful, "
               f"{probes.get('benign')} XSTest-safe, {probes.get('task')} task; judge {m.get('judge')}): "
               + (f"first significant rise over the start at step {first} of {pts[-1]['step']}."
                  if first is not None else f"no significant rise over the start in {pts[-1]['step']} steps."),
               "", curve_table(pts, markdown=True), ""]
    return "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the study's work folder")
    p.add_argument("--out", required=True, help="where to write the section, the figure and the points")
    a = p.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    files = {n: work / n / "safety_monitor.json" for n in FINE_TUNES}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if len(missing) == len(files):
        p.error(f"no safety_monitor.json under {work} (expected {', '.join(missing)}): run the study with monitor_steps")
    curves = {n: read_curve(f) for n, f in files.items() if f.is_file()}
    meta = {n: json.loads(f.read_text()).get("meta", {}) for n, f in files.items() if f.is_file()}
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, out / "monitor_curves.png", title="Unsafe rate while fine-tuning")
    md = section(curves, meta)
    (out / "monitor_curves.md").write_text(md + "\n")
    (out / "monitor_curves.json").write_text(json.dumps({"curves": curves, "meta": meta}, indent=1) + "\n")
    print(md)
    print(f"wrote {out / 'monitor_curves.md'}, {out / 'monitor_curves.png'}, {out / 'monitor_curves.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
