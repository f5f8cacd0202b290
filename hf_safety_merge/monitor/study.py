"""The study's hook: a monitor configured like the study's evaluation, for its fine-tunes."""

from __future__ import annotations

from typing import Any

from .callback import SafetyMonitorCallback
from .config import SafetyMonitorConfig

__all__ = ["monitor_fine_tune"]


def monitor_fine_tune(trainer: Any, *, steps: int = 25, harmful_size: int = 32, benign_size: int = 8,
                      task: Any = None, max_new_tokens: int = 32, judge: Any = "auto",
                      data_dir: str | None = None, output_file: str | None = None, **options: Any) -> SafetyMonitorCallback:
    """Attach a ``warn``-policy :class:`SafetyMonitorCallback` to one of the study's trainers
    (``Stages.sft`` builds them) before ``trainer.train()``; the curve lands in
    ``<output_dir>/safety_monitor.json`` (or ``output_file``) and in the trainer's log history.

    The study's evaluation is held-out AdvBench, XSTest-safe and arithmetic with exact answers, so
    pass ``task=[(problem, answer), ...]`` from its held-out task rows to get the task curve too.
    """
    cfg = SafetyMonitorConfig(steps=steps, policy=options.pop("policy", "warn"), harmful_size=harmful_size,
                              benign_size=benign_size, task=task, task_metric=options.pop("task_metric", "number"),
                              max_new_tokens=max_new_tokens, judge=judge, data_dir=data_dir, output_file=output_file,
                              print_table=options.pop("print_table", True), **options)
    return SafetyMonitorCallback(cfg, trainer=trainer)
