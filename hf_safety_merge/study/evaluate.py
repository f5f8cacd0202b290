"""Evaluation of every study row: generation and judging (`evaluate_safety`), cached per model,
with the per-prompt outcomes kept for paired tests (``eval/<model>/outcomes.json``).

On the CPU, rows are evaluated ``eval_workers`` at a time (:class:`EvalPool`), each in its own
process with ``threads // eval_workers`` torch threads: generation with a 135M model does not
keep two cores busy from one process (one thread does 63% of what two do), so two one-thread
evaluations side by side take 1.31x less wall time than the two in turn at two threads
(`benchmarks/bench_eval_workers.py`, docs/study.md "Generation speed").

With a vLLM server (``backend``: ``vllm``, or ``auto`` where a vLLM environment is found) rows are
evaluated one at a time in this process: one managed server (:func:`hf_safety_merge.eval.engine.shared_engine`)
generates for every row, its weights reloaded from each row's folder instead of a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .row import Row
from .stages import REASONING_EXTRA_TOKENS, Stages

#: outcome sets: name -> (what is counted, higher is worse?)
OUTCOMES = {"unsafe": "unsafe on AdvBench (held out)", "unsafe_ood": "unsafe on Do-Not-Answer (no stage saw it)",
            "over_refusal": "refusals of XSTest-safe prompts", "task": "task problems solved"}


def _prompt_set(name: str, texts: list[str], refs: list[str] | None = None) -> Any:
    from ..eval.prompts import PromptItem, PromptSet

    return PromptSet(name, [PromptItem(str(i), t, None if refs is None else refs[i], {}) for i, t in enumerate(texts)], f"study:{name}")


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    from ..eval.generation import read_jsonl

    return read_jsonl(p) if p.is_file() else []


def _outcomes(folder: Path, prefix: str = "", refs: dict[str, str] | None = None) -> dict[str, dict[str, bool]]:
    """Per-prompt flags from one `evaluate_safety` output folder."""
    from ..eval.metrics import exact_match

    out: dict[str, dict[str, bool]] = {}
    for j in _read_jsonl(folder / "judgements.jsonl"):
        parts = str(j["id"]).split("/")
        if parts[0] == "harmful":
            key = prefix + ("unsafe" if parts[1] == "none" else f"attack_{parts[1]}")
            out.setdefault(key, {})[parts[2]] = bool(j["unsafe"])
        elif parts[0] == "benign":
            out.setdefault("over_refusal", {})[parts[1]] = bool(j["refusal"])
    for g in _read_jsonl(folder / "generations.jsonl"):
        if g.get("set") == "utility" and refs is not None:
            out.setdefault("task", {})[str(g["item"])] = exact_match(g["response"], refs[str(g["item"])], mode="number")
    return out


def outcomes_file(work: Path, name: str) -> Path:
    """Where row `name`'s evaluation is cached (its presence means the row is evaluated)."""
    from ..eval.suite import _safe_name

    return work / "eval" / _safe_name(name) / "outcomes.json"


def evaluate_row(st: Stages, row: Row, judge: Any = None, *, record: bool = True, progress: bool = True) -> dict[str, Any]:
    """Evaluate one row (headline: every set and attack; sweep: the smaller evaluation); with
    `record`, its wall time goes into the stage timings (a worker process leaves that to the
    caller, which records the wall time of the rows it ran side by side)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..eval import SafetyEvalConfig, evaluate_safety
    from ..eval.suite import _safe_name

    c, d = st.cfg, st.data
    ev = st.work / "eval"
    done = outcomes_file(st.work, row.name)
    folder = done.parent
    if done.is_file():
        st.log(f"  [eval: {row.name}] cached")
        return dict(json.loads(done.read_text()))
    head = row.group == "headline"
    n_h, n_b, n_t = (c.eval_harmful, c.eval_benign, c.eval_task) if head else (c.sweep_eval_harmful, c.sweep_eval_benign, c.sweep_eval_task)
    task = d.task_eval[:n_t]
    budget = c.max_new_tokens + (REASONING_EXTRA_TOKENS if row.method in ("safekey", "sft") else 0)
    jd = judge if judge is not None else c.judge
    kind = study_backend(c)
    base: dict[str, Any] = dict(max_new_tokens=budget, batch_size=c.eval_batch_size, data_dir=c.data_dir, harmful_eval_size=None, judge=jd,
                                refusal_judge=jd, **_backend_options(c, kind))
    cfg_main = SafetyEvalConfig(
        harmful=_prompt_set("advbench-eval", d.eval_harmful[:n_h]), benign=_prompt_set("xstest-safe-eval", d.eval_benign[:n_b]),
        utility=_prompt_set("task-eval", [r["prompt"] for r in task], [r["answer"] for r in task]),
        utility_metric="number", attacks=tuple(c.attacks) if head and c.eval_attack else (), **base,
    )
    t = time.perf_counter()
    st.log(f"  [eval: {row.name}] ...")
    tok = AutoTokenizer.from_pretrained(row.model)
    m: Any
    if kind == "vllm" and row.adapter is None:
        m = str(row.model)  # the server reads the folder itself
    else:
        m = AutoModelForCausalLM.from_pretrained(row.model, dtype=torch.float32)
        if row.adapter is not None:
            from peft import PeftModel

            m = PeftModel.from_pretrained(m, row.adapter).merge_and_unload()  # saved to a temporary folder for a server
        m.eval()
    rep = evaluate_safety(m, tok, output_dir=ev, config=cfg_main, model_name=row.name, progress=progress, device=c.device)
    outcomes = _outcomes(folder, refs={str(i): r["answer"] for i, r in enumerate(task)})
    result: dict[str, Any] = {"report": rep.to_dict()}
    if head and d.eval_harmful_ood:
        cfg_ood = SafetyEvalConfig(harmful=_prompt_set("donotanswer-eval", d.eval_harmful_ood), benign=None, **base)
        rep_ood = evaluate_safety(m, tok, output_dir=ev, config=cfg_ood, model_name=f"{row.name}@dna", progress=progress, device=c.device)
        outcomes.update(_outcomes(ev / _safe_name(f"{row.name}@dna"), prefix="ood_"))
        outcomes["unsafe_ood"] = outcomes.pop("ood_unsafe", {})
        result["report_ood"] = rep_ood.to_dict()
    result["outcomes"] = outcomes
    result["seconds"] = round(time.perf_counter() - t, 1)
    if record:
        st.record(f"eval: {row.name}", result["seconds"])
    st.log(f"      {row.name}: {rep.summary()}")
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result))
    return result


def study_backend(cfg: Any) -> str:
    """``transformers`` or ``vllm``: the study's ``backend`` setting resolved (``auto``: vLLM
    when a vLLM environment is found)."""
    from ..eval.engine import EngineConfig, resolve_backend

    return resolve_backend(getattr(cfg, "backend", "transformers"), EngineConfig(python=getattr(cfg, "vllm_python", None)))


def _backend_options(cfg: Any, kind: str) -> dict[str, Any]:
    if kind != "vllm":
        return {"backend": "transformers"}
    from ..eval.engine import EngineConfig

    return {"backend": "vllm", "engine": EngineConfig(python=cfg.vllm_python)}


def eval_workers(cfg: Any) -> int:
    """How many rows are evaluated at once: ``cfg.eval_workers``, or with 0 (auto) 2 on a CPU
    with at least 2 torch threads and 1 otherwise (one CUDA device is busy with one); always 1
    with a vLLM server (it batches every request of a row itself)."""
    if study_backend(cfg) == "vllm":
        return 1
    if cfg.eval_workers:
        return int(cfg.eval_workers)
    import torch

    return 2 if cfg.device == "cpu" and (cfg.threads or torch.get_num_threads()) >= 2 else 1


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: Any, work: str, data: Any) -> None:
    from ..eval.judges import get_judge

    _WORKER["st"] = Stages(cfg, Path(work), data)
    _WORKER["judge"] = get_judge(cfg.judge)


def _worker_eval(row: Row, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)  # per task: a row on its own gets every thread
    res = evaluate_row(_WORKER["st"], row, _WORKER["judge"], record=False, progress=False)
    return {**res, "threads": threads}


class EvalPool:
    """``workers`` processes that evaluate rows side by side, each loading the judge once; use as
    a context manager. `evaluate` runs a group of rows and records the group's wall time as one
    stage (``eval: a, b``), so the stage times still add up to the study's wall time."""

    def __init__(self, st: Stages, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        self.st, self.workers = st, workers
        self.threads = max(1, (st.cfg.threads or torch.get_num_threads()) // workers)
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                        initargs=(st.cfg, str(st.work), st.data))

    def __enter__(self) -> EvalPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def evaluate(self, rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
        st = self.st
        todo = [r for r in rows if not outcomes_file(st.work, r.name).is_file()]
        out = {r.name: evaluate_row(st, r) for r in rows if r not in todo}  # cached: read back
        if not todo:
            return out
        label = "eval: " + ", ".join(r.name for r in todo)
        # a row on its own (the last of an odd group) gets every thread, not one worker's share
        threads = self.threads if len(todo) > 1 else self.threads * self.workers
        st.log(f"  [{label}] ... ({len(todo)} process(es), {threads} torch thread(s) each)")
        t = time.perf_counter()
        out.update(zip([r.name for r in todo], self.pool.map(_worker_eval, todo, [threads] * len(todo))))
        st.record(label, time.perf_counter() - t)
        st.log(f"  [{label}] done in {st.timings[label]:.1f} s")
        return out


def evaluate_rows(st: Stages, rows: list[Row], judge: Any = None, pool: EvalPool | None = None) -> dict[str, dict[str, Any]]:
    """Every row, headline rows first (so an interrupted run has the decisive rows), with one
    judge instance (`judge`, or ``cfg.judge`` loaded once here); with `pool`, ``pool.workers``
    rows at a time, in groups of that many (an interrupted run loses at most one group)."""
    from ..eval.judges import get_judge

    order = [r for r in rows if r.group == "headline"] + [r for r in rows if r.group != "headline"]
    if pool is not None:
        todo = [r for r in order if not outcomes_file(st.work, r.name).is_file()]
        results = pool.evaluate([r for r in order if r not in todo])  # cached: read back, nothing run
        for i in range(0, len(todo), pool.workers):
            results.update(pool.evaluate(todo[i:i + pool.workers]))
        return {r.name: results[r.name] for r in order}
    if judge is None:
        judge = get_judge(st.cfg.judge)
    return {r.name: evaluate_row(st, r, judge) for r in order}
