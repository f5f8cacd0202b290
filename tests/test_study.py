"""The safety-transfer study (`hf_safety_merge.study`): config validation, disjoint data splits,
the statistics, and the whole align -> break -> repair -> evaluate -> report pipeline on a tiny
chat model (real TRL training, real merges, real generation and judging; the numbers mean
nothing at this size)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.study import StudyConfig, arithmetic, load_study_data
from hf_safety_merge.study.config import FULL_HEADLINE_ROWS
from hf_safety_merge.study.stats import mcnemar, pareto_front


def test_presets_and_errors(tmp_path: Path) -> None:
    demo = StudyConfig.preset("demo")
    full = StudyConfig.preset("full")
    assert demo.eval_harmful < full.eval_harmful and set(demo.methods) <= set(full.methods)
    # the full preset carries the reference settings (docs/study.md's table)
    assert (full.lora_lr, full.lora_r, full.lora_alpha, tuple(full.lora_target_modules)) == (5e-5, 8, 32, ("q_proj", "v_proj"))
    assert (full.distill_lr, full.distill_epochs, full.distill_batch_size) == (1e-5, 4.0, 16)
    assert (full.safekey_lr, full.safekey_epochs, full.safekey_last_k_epochs) == (1e-5, 5.0, 2.0)
    assert full.task_train == 900 and round(full.task_train * full.harmful_frac / (1 - full.harmful_frac)) == 100
    assert 0.1 in full.enchtable_betas and 1.0 in full.asft_lambdas
    assert full.eval_harmful + full.eval_harmful_ood >= 150 and full.eval_benign == 125 and full.eval_task >= 150
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        StudyConfig.preset("dmeo")
    with pytest.raises(ConfigError, match=r"unknown study option .eval_harmfull.*eval_harmful"):
        StudyConfig.preset("demo", eval_harmfull=3)
    with pytest.raises(ConfigError, match="study method 'enchtable_ffn'"):
        StudyConfig.preset("demo", methods=["enchtable_ffn"])
    with pytest.raises(ConfigError, match=r"safekey_settings entry '0\.2'"):
        StudyConfig.preset("demo", safekey_settings=["0.2"])
    with pytest.raises(ConfigError, match="harmful_frac"):
        StudyConfig.preset("demo", harmful_frac=1.0)
    with pytest.raises(ConfigError, match="sweep_variant 'ffn' is not in distill_variants"):
        StudyConfig.preset("full", distill_variants=["attn"], sweep_variant="ffn")
    with pytest.raises(ConfigError, match="'asft' needs break_modes to include 'lora'"):
        StudyConfig.preset("full", break_modes=["full"])
    with pytest.raises(ConfigError, match="eval_attack=5 must be 0 or eval_harmful"):
        StudyConfig.preset("full", eval_attack=5)
    p = tmp_path / "s.yaml"
    # a typo in headline_rows would demote a decisive row: it fails before any work starts
    from hf_safety_merge.study import run_study
    from hf_safety_merge.study.run import planned_rows

    head, sweep = planned_rows(full)
    assert set(FULL_HEADLINE_ROWS) <= set(head) and "ft-full+ties" in sweep
    with pytest.raises(ConfigError, match=r"headline_rows entry 'ft-ful' .*did you mean 'ft-full'"):
        run_study(full.replace(headline_rows=["ft-ful"]), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    p.write_text("preset: demo\neval_task: 50\n")
    assert StudyConfig.from_file(p).eval_task == 50
    p.write_text("- a\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        StudyConfig.from_file(p)


def test_data_splits_are_disjoint(shared_data: Path) -> None:
    cfg = StudyConfig.preset("full", data_dir=str(shared_data))
    d = load_study_data(cfg)
    harm = [d.align_harmful, d.break_harmful, d.distill_harmful, d.calib_harmful, d.eval_harmful, d.eval_harmful_ood]
    # each paper's regime: the full fine-tune on benign task rows (EnchTable), the LoRA ones on 900 + 100 (AsFT)
    from hf_safety_merge.study.stages import Stages

    st = Stages(cfg, Path("/nonexistent"), d, log=lambda _m: None)
    full_rows, lora_rows = st.break_pairs(cfg.full_harmful_frac), st.break_pairs()
    assert (len(full_rows), len(lora_rows)) == (900, 1000)
    assert sum(r.startswith("Sure, here is how to") for _, r in lora_rows) == 100
    assert not any(r.startswith("Sure, here is how to") for _, r in full_rows)
    for i, a in enumerate(harm):
        for b in harm[i + 1:]:
            assert not set(a) & set(b)
    benign = [d.align_benign, d.calib_benign, d.eval_benign]
    for i, a in enumerate(benign):
        for b in benign[i + 1:]:
            assert not set(a) & set(b)
    assert not {r["prompt"] for r in d.task_train} & {r["prompt"] for r in d.task_eval}
    assert len({r["prompt"] for r in d.task_train}) == len(d.task_train) == cfg.task_train
    sizes = d.sizes()
    assert sizes["eval_harmful"] == 100 and sizes["eval_harmful_ood"] == 50 and sizes["eval_benign"] == 125
    assert sizes["task_eval"] == 150 and sizes["break_harmful"] == 100 and sizes["align_harmful"] == cfg.align_harmful
    assert load_study_data(cfg).eval_harmful == d.eval_harmful  # seeded
    with pytest.raises(ConfigError, match=r"advbench.csv: the AdvBench splits need"):
        load_study_data(cfg.replace(align_harmful=400))


def test_arithmetic_answers_are_exact_and_distinct() -> None:
    rows = arithmetic(500, 0)
    assert len({r["prompt"] for r in rows}) == 500
    for r in rows:
        expr = r["prompt"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == r["answer"] and r["response"].endswith(f"The answer is {r['answer']}.")
    assert not {r["prompt"] for r in arithmetic(50, 1, exclude={r["prompt"] for r in rows})} & {r["prompt"] for r in rows}


def test_mcnemar_exact_and_pareto() -> None:
    # b01 = 0, b10 = 6: p = 2 * 0.5^6
    a = {str(i): i < 6 for i in range(20)}
    b = dict.fromkeys(a, False)
    t = mcnemar(a, b)
    assert (t["b01"], t["b10"], t["n"]) == (0, 6, 20) and t["p"] == pytest.approx(2 / 64) and t["diff"] == pytest.approx(-0.3)
    assert mcnemar(a, a)["p"] == 1.0
    # against the "minlike" definition of the two-sided binomial test (scipy's binomtest): the
    # total probability of every split at most as likely as the observed one
    from fractions import Fraction
    from math import comb

    rng = random.Random(0)
    for _ in range(20):
        x = {str(i): rng.random() < 0.4 for i in range(60)}
        y = {str(i): rng.random() < 0.6 for i in range(60)}
        t = mcnemar(x, y)
        m = t["b01"] + t["b10"]
        obs = Fraction(comb(m, t["b01"]), 2**m)
        ref = sum(Fraction(comb(m, k), 2**m) for k in range(m + 1) if Fraction(comb(m, k), 2**m) <= obs)
        assert t["p"] == pytest.approx(min(1.0, float(ref)), rel=1e-9)
    assert pareto_front([("a", 0.1, 0.5), ("b", 0.2, 0.4), ("c", 0.0, 0.3), ("d", 0.1, 0.5)]) == ["a", "c", "d"]


def test_pareto_compares_rows_on_the_prompts_they_share() -> None:
    from hf_safety_merge.study.report import _common_rates, _pareto

    def res(unsafe: list[bool], task: list[bool], orf: list[bool]) -> dict[str, Any]:
        return {"outcomes": {"unsafe": {str(i): v for i, v in enumerate(unsafe)}, "task": {str(i): v for i, v in enumerate(task)},
                             "over_refusal": {str(i): v for i, v in enumerate(orf)}}}

    # headline rows: 4 prompts per set; the sweep row: the first 2 of each
    results = {"ft": res([True, True, False, False], [True, False, True, True], [False] * 4),
               "aligned": res([False] * 4, [False] * 4, [False, False, True, True]),
               "ft+x": res([False, False], [True, False], [False, False])}
    rates, n = _common_rates(results, ["ft", "ft+x", "aligned"])
    assert n == {"unsafe": 2, "task": 2, "over_refusal": 2}
    assert rates["ft"]["unsafe"]["value"] == 1.0 and rates["ft"]["task"]["value"] == 0.5  # not 0.5 / 0.75 on all 4
    assert rates["aligned"]["over_refusal"]["value"] == 0.0  # not 0.5
    recs = {k: {"repairs": "ft" if k == "ft+x" else None, "method": "enchtable" if k == "ft+x" else None} for k in results}
    p = _pareto(recs, results, "ft")
    assert p["front"] == ["ft+x"] and p["best_at_target"]["enchtable"]["row"] == "ft+x" and p["n_common"]["unsafe"] == 2


def test_study_end_to_end_on_a_tiny_model(shared_data: Path, tmp_path: Path) -> None:
    from hf_safety_merge.study import run_study
    from hf_safety_merge.testing.distill import make_tiny_chat_model

    model = make_tiny_chat_model(tmp_path / "tiny", "llama")
    cfg = StudyConfig.preset(
        "full", model=str(model), data_dir=str(shared_data), align_harmful=8, align_benign=8, task_train=18,
        distill_harmful=8, distill_epochs=1, distill_batch_size=4, batch_size=4, eval_harmful=8, eval_harmful_ood=6,
        eval_benign=8, eval_task=8, eval_attack=8, sweep_eval_harmful=4, sweep_eval_benign=4, sweep_eval_task=4,
        max_new_tokens=8, max_length=96, task_epochs=1, lora_epochs=1, align_epochs=1, safekey_epochs=2,
        safekey_last_k_epochs=1, safekey_task_rows=8, threads=1, distill_variants=("attn", "ffn"),
        sweep_enchtable_betas=(1.0,), sweep_resta_betas=(), sweep_asft_lambdas=(10.0,),
        methods=("enchtable", "calibrated", "repair", "resta", "safe_lora", "ties", "asft", "safekey"),
        repair_methods=("enchtable", "resta", "safe_lora"), repair_probes=2, repair_max_over_refusal_increase=1.0,
        repair_max_utility_drop=1.0,
        calibration_prompts=6, calibration_probes=3, attacks=("prefill",),  # short prompts: DAN is tested in test_prefix_cache
    )
    work = tmp_path / "work"
    payload = run_study(cfg, work)
    rows = {r["model"]: r for r in payload["rows"]}
    # the full preset's headline rows come first; the rest of the headline plan is demoted to the sweep evaluation
    assert list(rows)[:4] == ["aligned", "ft-full", "ft-lora", "ft-full+enchtable-attn"]
    for n in FULL_HEADLINE_ROWS:
        assert rows[n]["group"] == "headline", n
    for n in ("base", "ft-lora+enchtable-attn", "ft-full+enchtable-attn-calibrated", "ft-full+resta", "ft-full+safe_lora",
              "ft-full+enchtable-attn-beta1", "ft-full+safe_lora-all", "ft-full+ties", "ft-lora+ties", "asft-lam10"):
        assert rows[n]["group"] == "sweep", n
    h, s = rows["ft-full+enchtable-attn"]["rates"], rows["ft-full+ties"]["rates"]
    assert (h["unsafe"]["n"], h["unsafe_ood"]["n"], h["over_refusal"]["n"], h["task"]["n"], h["attack_prefill"]["n"]) == (8, 6, 8, 8, 8)
    assert (s["unsafe"]["n"], s["unsafe_ood"], s["over_refusal"]["n"], s["task"]["n"]) == (4, None, 4, 4)
    reg = rows["ft-full+enchtable-attn"]["regime"]
    assert reg["alpha"] == pytest.approx(0.1 * reg["ratio"], rel=1e-6)  # alpha = beta ||tau|| / ||Delta_s||
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    assert payload["diagnostics"]["alignment"]["n"] == 2 * layers  # q_proj and v_proj of every layer
    papers = {v["paper"] for v in payload["verdicts"]}
    assert "ft-full+dare" not in rows and "ft-full+enchtable-attn_ffn" not in rows  # only what `methods` / variants name
    assert papers == {"EnchTable", "EnchTable's bar (repair)", "AsFT", "SafeKey"}
    assert all(v["verdict"] in ("yes", "no") for v in payload["verdicts"])
    # the recommended repair: one answer per fine-tune, its search in the card, the choice in the row's setting
    assert [a["row"] for a in payload["answers"]] == ["ft-full+repair", "ft-lora+repair"]
    rep = json.loads((work / "ft-full+repair" / "repair.json").read_text())
    assert [s["method"] for s in rep["searches"]] == ["enchtable", "enchtable", "task_arithmetic", "safe_lora"]
    assert rep["chosen"] is not None and rows["ft-full+repair"]["setting"].startswith("repair: ")
    # the utility constraint: the task problems of its own are probed at every setting
    assert rep["target"]["max_utility_drop"] == 1.0 and rep["baseline"]["utility"]["n"] > 0
    assert all(p["utility"] is not None for s in rep["searches"] for p in s["probes"])
    t = payload["tests_vs_broken"]["ft-full+enchtable-attn"]["unsafe"]
    assert t["n"] == 8 and 0 <= t["p"] <= 1
    assert set(payload["pareto"]) == {"ft-full", "ft-lora"} and payload["pareto"]["ft-full"]["front"]
    md = (work / "study.md").read_text()
    assert md.startswith("# Safety-transfer study\n\n**What to ship: ft-full: unsafe ")
    for heading in ("## Headline rows", "## Sweep rows", "## Paired tests", "## Verdicts", "## Pareto view", "## Regime measurements", "Wall time"):
        assert heading in md
    assert (work / "report" / "pareto_ft-full.png").stat().st_size > 1000
    # the full preset probes both fine-tunes while they train (monitor_steps): start and end at least
    assert "## When is safety lost?" in md and (work / "report" / "monitor_curves.png").stat().st_size > 1000
    assert set(payload["monitor"]) == {"ft-full", "ft-lora"}
    assert all(len(c) >= 2 and c[0]["label"] == "start" for c in payload["monitor"].values())
    card = (work / "ft-full+enchtable-attn" / "README.md").read_text()  # the patched model's card
    assert "## Evaluation" in card and "model-index" in card
    assert all(payload["timings"][k] > 0 for k in ("align", "break: ft-full", "train: ft-lora", "train: asft"))
    # a second run resumes from the cache: no stage is re-run
    again = run_study(cfg, work)
    assert again["timings"] == payload["timings"]
    assert json.loads((work / "study.json").read_text())["rows"] == again["rows"]
    # report_only rewrites the report from what is evaluated, building nothing; on an empty folder it refuses
    # (a headline row not evaluated yet, as while a run is still going, is left out, not evaluated)
    shutil.rmtree(work / "eval" / "asft-lam10")
    shutil.rmtree(work / "eval" / "asft")
    partial = run_study(cfg, work, report_only=True)
    left = {r["model"] for r in partial["rows"]}
    assert "asft-lam10" not in left and "asft" not in left and len(partial["rows"]) == len(again["rows"]) - 2
    assert not (work / "eval" / "asft-lam10").exists() and not (work / "eval" / "asft").exists()
    with pytest.raises(ConfigError, match="report_only"):
        run_study(cfg, tmp_path / "empty", report_only=True)


def test_eval_workers_resolution() -> None:
    from hf_safety_merge.study.evaluate import eval_workers

    assert eval_workers(StudyConfig(threads=2)) == 2  # auto on a 2-thread CPU: two one-thread processes
    assert eval_workers(StudyConfig(threads=1)) == 1
    assert eval_workers(StudyConfig(threads=2, device="cuda")) == 1
    assert eval_workers(StudyConfig(threads=1, eval_workers=3)) == 3
    with pytest.raises(ConfigError, match="calibration_prompts"):
        StudyConfig(methods=("calibrated",), calibration_prompts=0)


def test_rows_evaluated_side_by_side_equal_one_process(shared_data: Path, tmp_path: Path) -> None:
    """Two worker processes of one torch thread each give the outcomes and responses of one
    one-thread process evaluating the rows in turn (same thread count: the same sums), and the
    pair's wall time is one stage, so the stage times still add up to the wall time."""
    import torch

    from hf_safety_merge.study import load_study_data
    from hf_safety_merge.study.evaluate import EvalPool, evaluate_rows
    from hf_safety_merge.study.run import build_headline
    from hf_safety_merge.study.stages import Stages
    from hf_safety_merge.testing.distill import make_tiny_chat_model

    model = make_tiny_chat_model(tmp_path / "tiny", "llama")
    cfg = StudyConfig.preset(
        "demo", model=str(model), data_dir=str(shared_data), align_harmful=8, align_benign=8, task_train=18,
        distill_harmful=8, distill_epochs=1, distill_batch_size=4, batch_size=4, eval_harmful=6, eval_benign=6,
        eval_task=6, sweep_eval_harmful=6, sweep_eval_benign=6, sweep_eval_task=6, max_new_tokens=8, max_length=96,
        task_epochs=1, align_epochs=1, threads=1, methods=("enchtable",),
    )
    data = load_study_data(cfg)
    for w in ("w", "one", "two"):
        (tmp_path / w).mkdir()
    threads = torch.get_num_threads()
    try:
        rows, _, _ = build_headline(Stages(cfg, tmp_path / "w", data, log=lambda _m: None))  # sets 1 thread
        rows = [r for r in rows if r.name in ("base", "aligned", "ft-full", "ft-full+enchtable-attn")]
        one = Stages(cfg, tmp_path / "one", data, log=lambda _m: None)
        seq = evaluate_rows(one, rows)
    finally:
        torch.set_num_threads(threads)
    two_cfg = cfg.replace(threads=2, eval_workers=2)
    two = Stages(two_cfg, tmp_path / "two", data, log=lambda _m: None)
    with EvalPool(two, 2) as pool:
        assert pool.threads == 1
        par = evaluate_rows(two, rows, pool=pool)
        alone = pool.evaluate([rows[0].__class__(**{**rows[0].__dict__, "name": "base-again"})])
    assert alone["base-again"]["threads"] == 2  # a row on its own gets both threads
    assert {par[r.name]["threads"] for r in rows} == {1}
    assert list(par) == list(seq) == [r.name for r in rows]
    for r in rows:
        assert par[r.name]["outcomes"] == seq[r.name]["outcomes"], r.name
        gen = [(tmp_path / w / "eval" / r.name.replace("+", "_") / "generations.jsonl").read_text() for w in ("one", "two")]
        assert [json.loads(x)["response"] for x in gen[0].splitlines()] == [json.loads(x)["response"] for x in gen[1].splitlines()]
    # rows in groups of two, each group's wall time one stage
    assert list(two.timings) == ["eval: base, aligned", "eval: ft-full, ft-full+enchtable-attn", "eval: base-again"]
    assert set(one.timings) == {f"eval: {r.name}" for r in rows}
