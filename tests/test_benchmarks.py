"""The merge benchmark runs end to end (prints its table, writes its JSON), and the measured
performance tables (docs/performance.md) are what `benchmarks/update_readme.py` generates from the
committed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_update_readme_performance_tables_are_generated_from_the_results() -> None:
    """docs/performance.md's tables between the markers are exactly what the script renders."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "update_readme.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, "docs/performance.md is stale: run `python benchmarks/update_readme.py`\n" + r.stderr


def test_update_readme_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    """A stale copy fails --check and is left alone by it; a rewrite gives back the committed page
    byte for byte, text outside the markers untouched; a file without the markers is refused."""
    script = str(ROOT / "benchmarks" / "update_readme.py")
    page = (ROOT / "docs" / "performance.md").read_text()
    head, rest = page.split("<!-- perf:begin -->", 1)
    _, tail = rest.split("<!-- perf:end -->", 1)
    stale = tmp_path / "performance.md"
    stale.write_text(f"{head}<!-- perf:begin -->\nold table\n<!-- perf:end -->{tail}")
    r = subprocess.run([sys.executable, script, "--check", "--target", str(stale)], capture_output=True, text=True)
    assert r.returncode == 1 and "old table" in stale.read_text()
    r = subprocess.run([sys.executable, script, "--target", str(stale)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert stale.read_text() == page
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    r = subprocess.run([sys.executable, script, "--target", str(bare)], capture_output=True, text=True)
    assert r.returncode == 2 and "markers" in r.stderr and bare.read_text() == "# no markers\n"


def test_readme_quotes_the_performance_page_and_its_caveat() -> None:
    """The README keeps no generated tables (they live in docs/performance.md), links that page
    and says that its merge numbers predate output hashing."""
    readme = (ROOT / "README.md").read_text()
    assert "<!-- perf:begin -->" not in readme and "<!-- perf:end -->" not in readme
    assert "docs/performance.md" in readme
    assert "benchmarks/results/output_hashing/README.md" in readme


def test_bench_merge_runs_side_by_side_and_writes_json(tmp_path: Path) -> None:
    """A tiny synthetic checkpoint: the I/O floor, task arithmetic, EnchTable and EnchTable's
    compute floor in one interleaved run; every row timed, EnchTable's stages reported."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--model", "synthetic-small",
                        "--shards", "2", "--repeats", "1", "--methods", "floor,raw_floor,task_arithmetic,enchtable,fine_floor_cached",
                        "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "results")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "| hf_safety_merge:enchtable |" in r.stdout and "| io_floor |" in r.stdout
    d = json.loads((tmp_path / "results" / "bench_merge_synthetic-small.json").read_text())
    res = d["results"]
    assert set(res) == {"io_floor", "io_floor_raw", "hf_safety_merge:task_arithmetic", "hf_safety_merge:enchtable",
                        "enchtable_fine_floor"}
    # the raw floor moves the task's bytes unchanged
    task = sorted((tmp_path / "work" / "inputs-synthetic-small" / "task").glob("model*.safetensors"))
    assert "byte-compiled" in d["package_bytecode"]
    assert len(task) >= 2 and all((tmp_path / "work" / "out-raw-floor" / f.name).read_bytes() == f.read_bytes() for f in task)
    assert all(v["seconds"] > 0 for v in res.values())
    timing = res["hf_safety_merge:enchtable"]["timing"]
    assert set(timing) == {"global_pass", "merge_pass"} and 0.0 <= timing["global_pass"]["overlap"] <= 1.0
    assert res["hf_safety_merge:task_arithmetic"]["peak_rss"] > 0


def test_bench_sharded_asft_runs_ddp_and_fsdp2_side_by_side(tmp_path: Path) -> None:
    """2 processes on a tiny Llama: DDP and FSDP2 rows, the penalty's bytes counted under FSDP2
    (none of its own under DDP), anchors per process half of the whole under FSDP2."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sharded_asft.py"), "--model", "tiny", "--targets", "qv",
                        "--steps", "1", "--warmup", "0", "--seq", "32", "--out", str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "| qv | ddp |" in r.stdout and "| qv | fsdp2 |" in r.stdout
    res = json.loads((tmp_path / "bench_sharded_asft.json").read_text())["results"]
    ddp, fsdp = res["qv/ddp"], res["qv/fsdp2"]
    assert ddp["penalty_bytes_sent_per_step"] == 0 and fsdp["penalty_bytes_sent_per_step"] > 0
    assert ddp["anchor_bytes_per_process"] == ddp["anchor_bytes_whole"] == fsdp["anchor_bytes_whole"]
    assert fsdp["anchor_bytes_per_process"] * 2 == fsdp["anchor_bytes_whole"]
    assert all(v["step_with_s"] > 0 and v["penalty_alone_s"] > 0 for v in res.values())


def test_study_monitor_curves_reads_a_work_folder(tmp_path: Path) -> None:
    """benchmarks/study_monitor_curves.py: the section and figure from the fine-tunes' monitor files."""
    def rate(k: int, n: int) -> dict:
        return {"k": k, "n": n, "value": k / n, "low": 0.0, "high": 1.0}

    for name, ks in (("ft-full", [1, 1, 17, 29]), ("ft-lora", [1, 1, 1, 0])):
        pts = [{"step": 10 * i, "unsafe": rate(k, 32), "over_refusal": rate(2, 8), "task": rate(i, 8),
                "eroded": k > 10} for i, k in enumerate(ks)]
        (tmp_path / "work" / name).mkdir(parents=True)
        (tmp_path / "work" / name / "safety_monitor.json").write_text(json.dumps(
            {"meta": {"steps": 10, "judge": "keyword", "probes": {"harmful": 32, "benign": 8, "task": 8}}, "points": pts}))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_monitor_curves.py"), "--work", str(tmp_path / "work"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    md = (out / "monitor_curves.md").read_text()
    assert "**ft-full**" in md and "first significant rise over the start at step 20 of 30" in md
    assert "**ft-lora**" in md and "no significant rise over the start in 30 steps" in md
    assert (out / "monitor_curves.png").stat().st_size > 1000
    assert set(json.loads((out / "monitor_curves.json").read_text())["curves"]) == {"ft-full", "ft-lora"}
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_monitor_curves.py"), "--work", str(tmp_path),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no safety_monitor.json" in bad.stderr and len(bad.stderr.strip().splitlines()) <= 3
