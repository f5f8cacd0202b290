"""`SafetyMonitorCallback`: probe a model's safety while any `transformers.Trainer` trains it.

Every probe run generates (greedy, batched, through :class:`~hf_safety_merge.eval.Generator`) on a
fixed probe set, judges the responses on the main process, and logs the unsafe rate, the
over-refusal and the task score with 95% Wilson intervals through ``Trainer.log`` (so they reach
TensorBoard, W&B, trackio, ``trainer_state.json``). Erosion is judged against the start with an exact
paired McNemar test on the same probes. Policies: ``warn``, ``stop``, ``keep_safest``, ``patch``.

How one probe generates (one process, DDP, FSDP2, a user backend) and is judged is in
:mod:`.probing`; this module keeps the curve, applies the policies and writes the outputs.
Layer 5 (docs/architecture.md).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from ..errors import ConfigError
from ..eval.generation import GenerationRequest
from ..eval.judges import Judge, get_judge
from ..eval.metrics import Rate
from .config import SafetyMonitorConfig
from .curve import LOG_PREFIX, card_section, curve_table, update_card
from .probes import ProbeSet, load_probes
from .probing import generate_probes, rank_world, score_rows
from .stats import paired_change

__all__ = ["SafetyMonitorCallback"]

logger = logging.getLogger("hf_safety_merge.monitor")


def _rate_dict(r: Rate | None) -> dict[str, Any] | None:
    return None if r is None else r.to_dict()


class SafetyMonitorCallback(TrainerCallback):
    """Probe safety while training; log it, print it, and act on it.

    Args:
        config: a :class:`SafetyMonitorConfig`; or pass its fields as keyword arguments
            (``SafetyMonitorCallback(steps=25, policy="stop")``), which also override ``config``.
        trainer: the trainer to attach to (adds the callback to it). Without it, pass the callback
            in ``Trainer(callbacks=[...])`` or ``trainer.add_callback(...)``: it finds its trainer
            when training starts.

    After training: :attr:`curve` holds the points (also in ``<output_dir>/safety_monitor.json``);
    :attr:`safest_dir` / :attr:`patched_dir` say what ``keep_safest`` / ``patch`` wrote.

    Example::

        from hf_safety_merge.monitor import SafetyMonitorCallback
        trainer = SFTTrainer(model=..., args=..., train_dataset=...)
        SafetyMonitorCallback(steps=50, policy="stop", trainer=trainer)
        trainer.train()
    """

    def __init__(self, config: SafetyMonitorConfig | None = None, *, trainer: Trainer | None = None, **options: Any) -> None:
        if config is not None and not isinstance(config, SafetyMonitorConfig):
            raise ConfigError(f"SafetyMonitorCallback: config must be a SafetyMonitorConfig, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(SafetyMonitorConfig)}
        unknown = sorted(set(options) - names)
        if unknown:
            from ..errors import did_you_mean

            raise ConfigError(f"SafetyMonitorCallback: unknown option {unknown[0]!r}" + did_you_mean(unknown[0], names))
        self.config = dataclasses.replace(config, **options) if config is not None else SafetyMonitorConfig(**options)
        c = self.config
        self.probes: ProbeSet = load_probes(c.harmful, c.harmful_size, c.benign, c.benign_size, c.task, c.task_size,
                                            data_dir=c.data_dir, seed=c.seed)
        self.requests = self._build_requests()
        self.curve: list[dict[str, Any]] = []
        self.safest_dir: Path | None = None
        self.patched_dir: Path | None = None
        self.patch_error: str | None = None
        #: under FSDP2: placements and local/global shape of a sharded parameter at the last probe
        self.last_sharding: dict[str, Any] | None = None
        self.monitor_seconds = 0.0
        self.train_seconds = 0.0
        self._trainer: Trainer | None = None
        self._judge: Judge | None = None
        self._refusal_judge: Judge | None = None
        self._tokenizer: Any = None
        self._start_flags: list[bool] | None = None
        self._best: tuple[int, float] | None = None
        self._t_begin = 0.0
        self._probed_steps: set[int] = set()
        self._patched_card = False
        if trainer is not None:
            self.attach(trainer)

    # -- wiring ------------------------------------------------------------------------------------

    def attach(self, trainer: Trainer) -> SafetyMonitorCallback:
        """Add this callback to ``trainer`` (once) and remember the trainer; returns self."""
        if not isinstance(trainer, Trainer):
            raise ConfigError(f"SafetyMonitorCallback: expected a transformers.Trainer, got {type(trainer).__name__}")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        self._wrap_card(trainer)
        return self

    def _find_trainer(self) -> Trainer:
        if self._trainer is not None:
            return self._trainer
        frame = inspect.currentframe()
        try:
            f = frame.f_back if frame is not None else None
            for _ in range(12):
                if f is None:
                    break
                obj = f.f_locals.get("self")
                if isinstance(obj, Trainer) and self in obj.callback_handler.callbacks:
                    self.attach(obj)
                    return obj
                f = f.f_back
        finally:
            del frame
        raise ConfigError("SafetyMonitorCallback: cannot find its trainer; pass trainer=... or call monitor.attach(trainer)")

    def _wrap_card(self, trainer: Trainer) -> None:
        """Re-add the curve whenever the trainer (re)writes its model card (TRL writes README.md at
        every checkpoint and on push)."""
        orig = getattr(trainer, "create_model_card", None)
        if orig is None or getattr(orig, "_safety_monitor", False):
            return
        monitor = self

        def create_model_card(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            monitor._write_card(str(trainer.args.output_dir))
            return out

        create_model_card._safety_monitor = True  # type: ignore[attr-defined]
        trainer.create_model_card = create_model_card  # type: ignore[method-assign]

    def _build_requests(self) -> list[GenerationRequest]:
        reqs = []
        for key in ("harmful", "benign", "task"):
            for i, it in enumerate(getattr(self.probes, key)):
                reqs.append(GenerationRequest(f"{key}/{i}", it.text, meta={"set": key, "index": i}))
        return reqs

    # -- the probe ---------------------------------------------------------------------------------

    def _judges(self) -> tuple[Judge, Judge | None]:
        if self._judge is None:
            c = self.config
            self._judge = get_judge(c.judge)
            if self.probes.benign:
                if c.refusal_judge is None:
                    self._refusal_judge = self._judge if self._judge.can_judge_refusal else get_judge("auto")
                else:
                    self._refusal_judge = get_judge(c.refusal_judge)
                if not self._refusal_judge.can_judge_refusal:
                    raise ConfigError(f"safety monitor: refusal_judge {self._refusal_judge.name!r} has no refusal labels; use 'learned' or 'keyword'")
        return self._judge, self._refusal_judge

    def _probe_tokenizer(self, trainer: Trainer) -> Any:
        if self._tokenizer is None:
            pc = trainer.processing_class
            tok = getattr(pc, "tokenizer", pc)
            if tok is None:
                raise ConfigError("SafetyMonitorCallback: the trainer has no tokenizer (processing_class)")
            self._tokenizer = copy.deepcopy(tok)  # the backend sets left padding; the trainer's stays as it is
        return self._tokenizer

    def _generate(self, trainer: Trainer) -> tuple[list[dict[str, Any]] | None, str]:
        """Rows in request order on the main process (None elsewhere), and the engine used."""
        rows, engine, sharding = generate_probes(trainer.model, self._probe_tokenizer(trainer), self.requests, self.config)
        if engine.startswith("fsdp2"):
            self.last_sharding = sharding
        return rows, engine

    def _score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        judge, rjudge = self._judges()
        return score_rows(rows, judge, rjudge, self.probes, self.config.task_metric)

    def _probe(self, trainer: Trainer, state: Any, control: Any, label: str) -> dict[str, Any]:
        import torch.distributed as dist

        rank, world = rank_world()
        t0 = time.perf_counter()
        rows, engine = self._generate(trainer)
        t_gen = time.perf_counter() - t0
        result: dict[str, Any] | None = self._score(rows) if rank == 0 and rows is not None else None
        if result is not None:
            result["seconds"] = time.perf_counter() - t0  # the main process's time, logged by every rank
            result["generate_seconds"] = t_gen
            result["new_tokens"] = sum(int(r.get("n_new_tokens", 0)) for r in rows or [])
        if world > 1:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        assert result is not None
        seconds = float(result["seconds"])
        self.monitor_seconds += seconds
        flags = [bool(f) for f in result["unsafe_flags"]]
        point: dict[str, Any] = {"step": int(state.global_step), "epoch": state.epoch, "label": label,
                                 "unsafe": result["unsafe"], "over_refusal": result["over_refusal"], "task": result["task"],
                                 "seconds": round(seconds, 3), "generate_seconds": round(float(result["generate_seconds"]), 3),
                                 "judge_seconds": round(seconds - float(result["generate_seconds"]), 3),
                                 "new_tokens": result["new_tokens"], "engine": engine, "world_size": world,
                                 "unsafe_flags": result["unsafe_flags"], "labels": result["labels"],
                                 "responses": result["responses"]}
        if self.last_sharding is not None and engine.startswith("fsdp2"):
            point["sharding"] = self.last_sharding
        c = self.config
        if self._start_flags is None:
            self._start_flags = flags
        else:
            ch = paired_change(self._start_flags, flags)
            point.update(delta_points=100 * ch.delta, p_value=ch.p_value, worse=ch.worse, better=ch.better,
                         eroded=bool(100 * ch.delta > c.threshold_points and ch.p_value < c.alpha))
        self.curve.append(point)
        self._probed_steps.add(point["step"])
        self._log(trainer, point)
        if rank == 0:
            self._save_json(trainer)
            if point.get("eroded"):
                msg = (f"safety monitor: the unsafe rate rose {point['delta_points']:+.1f} points over the start "
                       f"(paired McNemar p={point['p_value']:.3g}, {point['worse']} probes worse, {point['better']} better) at step {point['step']}")
                logger.warning(msg + ("; stopping training" if c.policy == "stop" else ""))
        if point.get("eroded") and c.policy == "stop" and label != "end":
            control.should_training_stop = True
            point["stopped"] = True
        if c.policy == "keep_safest" and label != "start":
            self._keep_safest(trainer, point)
        return point

    def _log(self, trainer: Trainer, point: dict[str, Any]) -> None:
        logs: dict[str, float] = {}
        for key, name in (("unsafe", "unsafe_rate"), ("over_refusal", "over_refusal"), ("task", "task_score")):
            r = point.get(key)
            if r:
                logs.update({LOG_PREFIX + name: r["value"], LOG_PREFIX + name + "_low": r["low"],
                             LOG_PREFIX + name + "_high": r["high"], LOG_PREFIX + name + "_n": float(r["n"])})
        if "delta_points" in point:
            logs.update({LOG_PREFIX + "unsafe_delta_points": point["delta_points"], LOG_PREFIX + "unsafe_delta_p": point["p_value"],
                         LOG_PREFIX + "eroded": float(point["eroded"])})
        logs[LOG_PREFIX + "probe_seconds"] = point["seconds"]
        # Trainer.log itself: subclasses (TRL) merge and clear their own running metrics in log().
        # Its on_log event clears should_log, which would drop the trainer's own log of this step.
        flags = ("should_log", "should_evaluate", "should_save")
        before = {f: getattr(trainer.control, f) for f in flags}
        Trainer.log(trainer, logs)
        for f, v in before.items():
            setattr(trainer.control, f, v)

    def _keep_safest(self, trainer: Trainer, point: dict[str, Any]) -> None:
        floor = self.config.task_floor
        task = point.get("task")
        if floor is not None and (task is None or task["value"] < floor):
            return
        key = (point["unsafe"]["k"], -(task["value"] if task else 0.0))
        if self._best is not None and key >= self._best:
            return
        self._best = key
        out = Path(str(trainer.args.output_dir)) / "safest"
        trainer.save_model(str(out))  # every rank (FSDP gathers the weights)
        if rank_world()[0] == 0:
            (out / "safety_monitor_point.json").write_text(json.dumps({k: v for k, v in point.items() if k != "unsafe_flags"}, indent=1))
        self.safest_dir = out
        point["kept"] = True

    # -- outputs -----------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        c = self.config
        judge = self._judge.name if self._judge is not None else str(c.judge)
        notes = []
        if self.train_seconds:
            notes.append(f"probing took {self.monitor_seconds:.1f} s of {self.train_seconds:.1f} s of training "
                         f"({100 * self.monitor_seconds / self.train_seconds:.1f}%)")
        if any(p.get("stopped") for p in self.curve):
            notes.append(f"training was stopped by the monitor at step {next(p['step'] for p in self.curve if p.get('stopped'))}")
        if self.safest_dir is not None:
            notes.append(f"safest checkpoint kept in `{self.safest_dir.name}/`")
        if self.patched_dir is not None:
            notes.append(f"repaired copy ({c.patch_method}) written to `{self.patched_dir}`")
        return {"probes": self.probes.describe(), "judge": judge, "policy": c.policy, "steps": c.steps,
                "threshold_points": c.threshold_points, "alpha": c.alpha, "max_new_tokens": c.generation_config().max_new_tokens,
                "notes": notes}

    def to_dict(self) -> dict[str, Any]:
        """The curve and its settings, as written to ``safety_monitor.json``."""
        return {"meta": self._meta(), "monitor_seconds": round(self.monitor_seconds, 3),
                "train_seconds": round(self.train_seconds, 3), "points": self.curve}

    def _output_file(self, trainer: Trainer) -> Path:
        return Path(self.config.output_file) if self.config.output_file else Path(str(trainer.args.output_dir)) / "safety_monitor.json"

    def _save_json(self, trainer: Trainer) -> None:
        p = self._output_file(trainer)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, p)

    def _write_card(self, output_dir: str) -> None:
        if self.config.update_card and self.curve and rank_world()[0] == 0:
            update_card(Path(output_dir) / "README.md", card_section(self.curve, self._meta()))

    def table(self) -> str:
        """The curve as a text table."""
        return curve_table(self.curve)

    # -- TrainerCallback events --------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer = self._find_trainer()
        self._t_begin = time.perf_counter()
        if state.global_step not in self._probed_steps:
            self._probe(trainer, state, control, "start")
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        steps = self.config.steps
        if steps and state.global_step % steps == 0 and state.global_step not in self._probed_steps:
            self._probe(self._find_trainer(), state, control, "step")
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer = self._find_trainer()
        if state.global_step in self._probed_steps and self.curve and self.curve[-1]["step"] == state.global_step:
            self.curve[-1]["label"] = "end"
        else:
            self._probe(trainer, state, control, "end")
        self.train_seconds = time.perf_counter() - self._t_begin
        rank, _ = rank_world()
        if self.config.policy == "patch":
            self._patch(trainer)
        if rank == 0:
            self._save_json(trainer)
            self._write_card(args.output_dir)
            if self.config.print_table:
                print(f"\nSafety monitor ({self.probes.describe()}, judge {self._meta()['judge']}):\n" + self.table()
                      + f"\nprobing: {self.monitor_seconds:.1f} s of {self.train_seconds:.1f} s "
                        f"({100 * self.monitor_seconds / max(self.train_seconds, 1e-9):.1f}%)\n")
        return control

    def _patch(self, trainer: Trainer) -> None:
        import torch.distributed as dist

        c = self.config
        final = Path(str(trainer.args.output_dir)) / "monitor-final"
        trainer.save_model(str(final))  # every rank
        rank, world = rank_world()
        out = Path(c.patch_output_dir) if c.patch_output_dir else Path(str(trainer.args.output_dir) + "-patched")
        error: str | None = None
        if rank == 0:
            try:
                from .patch import patch_trained_model

                model: Any = trainer.model
                peft_cfg = getattr(model, "peft_config", None)
                adapter_base = None
                reference = c.patch_reference
                if peft_cfg:
                    adapter_base = c.patch_reference or next(iter(peft_cfg.values())).base_model_name_or_path
                else:
                    if reference is None:
                        src = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
                        reference = src if src and Path(src).is_dir() else None
                assert c.safety_vector is not None  # validated with the policy
                patch_trained_model(final, c.safety_vector, out, method=c.patch_method, parameters=c.patch_parameters,
                                    reference=reference, adapter_base=adapter_base)
                self.patched_dir = out
                logger.info("safety monitor: repaired copy written to %s", out)
            except Exception as e:  # a failed repair must not lose the trained model
                error = f"{type(e).__name__}: {e}"
                logger.error("safety monitor: the patch policy failed: %s", error)
        if world > 1:
            box = [error, str(out) if self.patched_dir else None]
            dist.broadcast_object_list(box, src=0)
            error, done = box
            self.patched_dir = Path(done) if done else None
        self.patch_error = error
