"""The study's repair stages: a merge at a fixed setting, EnchTable with a calibrated beta, and the
recommended repair (`hf_safety_merge.calibrate.repair`), each cached like every stage.

Layer 6 (docs/architecture.md).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .data import StudyData
from .row import Row


class RepairStages:
    """The repair stages of :class:`~hf_safety_merge.study.stages.Stages` (a mixin: it uses the
    work folder, the data, the log and `stage` of the class it is mixed into)."""

    cfg: StudyConfig
    work: Path
    data: StudyData
    log: Callable[[str], None]

    def stage(self, name: str, out: Path, fn: Callable[[], Any]) -> Path:  # pragma: no cover - Stages.stage
        raise NotImplementedError

    def merge(self, row: Row, method: str, params: dict[str, Any], vector: Path, task: Path, lora: bool, aligned: Path) -> Row:
        from ..merge import merge
        from ..merge.config import SafetyMergeConfig

        c = self.cfg
        out = self.work / row.name
        kw: dict[str, Any] = dict(safety_vector=str(vector), method=method, parameters=params, output_dir=str(out),
                                  overwrite=True, device=c.device)
        kw.update(task_model=str(aligned), task_adapter=str(task)) if lora else kw.update(task_model=str(task), task_reference=str(aligned))

        def run() -> None:
            self.log(f"      {merge(SafetyMergeConfig(**kw), progress=True)}")

        self.stage(f"repair: {row.name}", out, run)
        row.model = out
        return row

    def calibrated(self, row: Row, vector: Path, task: Path, lora: bool, aligned: Path) -> Row:
        """EnchTable with beta chosen by calibration on the calibration prompts (used by no other
        stage); the row is evaluated on the held-out prompts like every other."""
        from ..calibrate import merge_calibrated
        from ..merge.config import SafetyMergeConfig
        from .data import write_prompts

        c, d = self.cfg, self.data
        out = self.work / row.name
        harmful = write_prompts(self.work / "calibration_harmful.csv", d.calib_harmful)
        benign = write_prompts(self.work / "calibration_benign.csv", d.calib_benign)
        kw: dict[str, Any] = dict(safety_vector=str(vector), method="enchtable", output_dir=str(out), overwrite=True, device=c.device)
        kw.update(task_model=str(aligned), task_adapter=str(task)) if lora else kw.update(task_model=str(task), task_reference=str(aligned))
        kw["calibration"] = {"harmful": harmful, "benign": benign, "num_harmful": max(1, len(d.calib_harmful)),
                             "num_benign": max(1, len(d.calib_benign)), "max_unsafe": c.calibration_max_unsafe,
                             "max_probes": c.calibration_probes, "max_new_tokens": c.max_new_tokens,
                             "batch_size": c.eval_batch_size, "holdout_split": False,
                             "max_over_refusal_increase": c.repair_max_over_refusal_increase, **_calibration_backend(c)}

        def run() -> None:
            from ..errors import CalibrationError

            try:
                res, cal = merge_calibrated(SafetyMergeConfig(**kw), progress=True)
            except CalibrationError as e:  # no beta keeps the constraints: the row is the unpatched fine-tune
                self.log(f"      {e}")
                out.mkdir(parents=True, exist_ok=True)
                (out / "calibration_failed.txt").write_text(str(e) + "\n")
                return
            self.log(f"      {cal.message()}\n      {res}")

        self.stage(f"repair: {row.name}", out, run)
        if (out / "calibration_failed.txt").is_file():
            row.model, row.adapter = (aligned, task) if lora else (task, None)
            row.setting += " (no beta keeps the constraints: the unpatched fine-tune)"
            return row
        row.model = out
        return row

    def repair(self, row: Row, vectors: dict[str, Path], align_vec: Path | None, task: Path, lora: bool, aligned: Path) -> Row:
        """The recommended repair (`hf_safety_merge.calibrate.repair`): ``repair_methods`` x scale
        searched constraint-first on the calibration prompts (used by no other stage); the row is
        evaluated on the held-out prompts like every other, which is the check of the choice."""
        from ..calibrate.repair import RepairConfig, repair
        from .data import write_prompts

        c, d = self.cfg, self.data
        out = self.work / row.name
        harmful = write_prompts(self.work / "calibration_harmful.csv", d.calib_harmful)
        benign = write_prompts(self.work / "calibration_benign.csv", d.calib_benign)
        kw: dict[str, Any] = dict(safety_vectors=[str(v) for v in vectors.values()], methods=list(c.repair_methods),
                                  alignment_vector=str(align_vec) if align_vec is not None else None,
                                  output_dir=str(out), overwrite=True, device=c.device,
                                  ranges={k: list(v) for k, v in c.repair_ranges.items()})
        kw.update(task_model=str(aligned), task_adapter=str(task)) if lora else kw.update(task_model=str(task), task_reference=str(aligned))
        kw["calibration"] = {"harmful": harmful, "benign": benign, "num_harmful": max(1, len(d.calib_harmful)),
                             "num_benign": max(1, len(d.calib_benign)), "max_unsafe": c.calibration_max_unsafe,
                             "max_over_refusal_increase": c.repair_max_over_refusal_increase,
                             "confidence": c.repair_confidence, "max_probes": c.repair_probes, "max_new_tokens": c.max_new_tokens,
                             "batch_size": c.eval_batch_size, "holdout_split": False, "judge": c.judge,
                             **_calibration_backend(c)}
        if c.repair_max_utility_drop is not None and d.calib_task:  # the task must survive the repair too
            utility = self.work / "calibration_task.csv"
            with utility.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=["prompt", "answer"])
                w.writeheader()
                w.writerows({"prompt": r["prompt"], "answer": r["answer"]} for r in d.calib_task)
            kw["calibration"].update(utility=str(utility), utility_metric="number", num_utility=len(d.calib_task),
                                     max_utility_drop=c.repair_max_utility_drop)

        def run() -> None:
            res = repair(RepairConfig(**kw), progress=True, on_infeasible="return")
            self.log(f"      {res.headline()}")
            if res.chosen is None:  # the answer is "ship nothing": the row is the unpatched fine-tune
                out.mkdir(parents=True, exist_ok=True)
                (out / "repair.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")

        self.stage(f"repair: {row.name}", out, run)
        info = json.loads((out / "repair.json").read_text())
        ch = info.get("chosen")
        if ch is None:
            row.model, row.adapter = (aligned, task) if lora else (task, None)
            row.setting = "repair: no setting keeps the constraints (the unpatched fine-tune)"
            return row
        row.model = out
        if ch:
            from ..methods.base import get_method_class

            name = get_method_class(ch["method"]).label or ch["method"]
            if ch["method"] == "enchtable":  # the vector names the variant (attn, ffn, ...)
                name += " " + Path(ch["vector"]).name.removeprefix("vector-")
            row.setting = f"repair: {name}, {ch['parameter']} {ch['value']:.3g}"
        return row


def _calibration_backend(cfg: StudyConfig) -> dict[str, Any]:
    """The study's generation backend for the calibration probes (the managed vLLM server when the
    study evaluates on it: the same server, the probe's weights reloaded)."""
    from ..eval.engine import EngineConfig, resolve_backend

    kind = resolve_backend(cfg.backend, EngineConfig(python=cfg.vllm_python))
    return {"backend": "vllm", "vllm_python": cfg.vllm_python} if kind == "vllm" else {}
