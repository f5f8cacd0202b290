"""The Space's "Training monitor" tab: plot a finished (or running) fine-tune's safety curve from
its logs, written by ``hf_safety_merge.monitor.SafetyMonitorCallback``.

Accepted: uploaded ``safety_monitor.json`` files (the monitor's own), ``trainer_state.json`` files
(the ``safety/*`` entries of the trainer's log history), or a Hub model repo id whose files hold
either. Several runs are plotted together (one line each).

``app.py`` calls :func:`build_monitor_tab` inside its ``gr.Tabs()``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from hf_safety_merge.monitor import curve_table, plot_curves, read_curve

__all__ = ["build_monitor_tab", "plot_run"]

COLUMNS = ["run", "step", "unsafe % [95% CI]", "vs start (points, p)", "over-refusal %", "task %"]


def _file_path(f: Any) -> str:
    return str(getattr(f, "name", None) or getattr(f, "path", None) or f)


def _hub_files(repo_id: str) -> list[tuple[str, str]]:
    from huggingface_hub import HfApi, hf_hub_download

    files = set(HfApi().list_repo_files(repo_id))
    for name in ("safety_monitor.json", "trainer_state.json"):
        if name in files:
            return [(repo_id, hf_hub_download(repo_id, name))]
    ckpts = sorted((f for f in files if f.endswith("/trainer_state.json")), reverse=True)
    if ckpts:
        return [(repo_id, hf_hub_download(repo_id, ckpts[0]))]
    raise gr.Error(f"{repo_id}: no safety_monitor.json or trainer_state.json in this repo")


def _rows(name: str, points: Sequence[dict[str, Any]]) -> list[list[str]]:
    lines = curve_table(points).splitlines()[2:]
    out = []
    for p, line in zip(points, lines):
        cells = [c for c in line.split("  ") if c.strip()]
        out.append([name, *[c.strip() for c in cells[:5]]])
        del p
    return out


def plot_run(files: Sequence[Any] | None, repo_id: str = "") -> tuple[str, list[list[str]], str]:
    """The curve(s) of uploaded log files and/or a Hub repo: a PNG path, the table rows, a summary."""
    sources: list[tuple[str, str]] = []
    for f in files or []:
        p = _file_path(f)
        sources.append((Path(p).name, p))
    if repo_id and repo_id.strip():
        sources += _hub_files(repo_id.strip())
    if not sources:
        raise gr.Error("Upload a safety_monitor.json or trainer_state.json, or give a Hub repo id.")
    curves: dict[str, list[dict[str, Any]]] = {}
    for name, path in sources:
        key = name if name not in curves else f"{name} ({len(curves) + 1})"
        try:
            curves[key] = read_curve(path)
        except Exception as e:  # one line for the user, not a traceback
            raise gr.Error(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    out = Path(tempfile.mkdtemp(prefix="hsm-monitor-")) / "safety_curve.png"
    fig = plot_curves(curves, out)
    import matplotlib.pyplot as plt

    plt.close(fig)
    rows = [r for name, pts in curves.items() for r in _rows(name, pts)]
    summary = []
    for name, pts in curves.items():
        first, last = pts[0]["unsafe"]["value"], pts[-1]["unsafe"]["value"]
        eroded = [p["step"] for p in pts if p.get("eroded")]
        summary.append(f"- **{name}**: unsafe {100 * first:.1f}% at step {pts[0]['step']} -> {100 * last:.1f}% at step "
                       f"{pts[-1]['step']}" + (f"; significant erosion from step {eroded[0]}" if eroded else ""))
    return str(out), rows, "\n".join(summary)


def build_monitor_tab() -> None:
    """The tab (call inside ``gr.Tabs()`` of a Blocks context)."""
    with gr.Tab("5 · Training monitor", id="monitor"):
        gr.Markdown(
            "Plot how a fine-tune's **safety changed while it trained**: the unsafe rate (with its 95% interval) and "
            "the over-refusal at every probe of `SafetyMonitorCallback` (`--safety_monitor_steps` on the training "
            "scripts). Upload the run's `safety_monitor.json` or `trainer_state.json` (several for a comparison), or "
            "give a Hub model repo that holds one."
        )
        with gr.Row():
            files_in = gr.File(label="safety_monitor.json / trainer_state.json", file_count="multiple", file_types=[".json"])
            with gr.Column():
                repo_in = gr.Textbox(label="…or a Hub model repo id", placeholder="your-name/your-fine-tune")
                plot_btn = gr.Button("Plot the curve", variant="primary")
        summary_out = gr.Markdown()
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                plot_out = gr.Image(label="Safety during training", type="filepath", interactive=False, height=360)
            with gr.Column(scale=2):
                table_out = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True)
        plot_btn.click(plot_run, [files_in, repo_in], [plot_out, table_out, summary_out], api_name="monitor_curve",
                       concurrency_limit=2)


if __name__ == "__main__":  # pragma: no cover - a quick look at one file
    import sys

    print(plot_run([os.fspath(a) for a in sys.argv[1:]]))
