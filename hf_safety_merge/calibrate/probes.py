"""In-memory merges at any scale, with everything that does not depend on the scale done once.

`ScaledMerge` opens the merge's inputs as the engine does (same plan checks), reads theta_task,
tau and Delta_s of every covered tensor once, and then gives the merged tensors for any scale
without touching the disk again. A method with `closed_form_scale` (EnchTable) is probed exactly
from per-matrix terms computed once (`scale_terms`, `merge_with_terms`: its coarse norms once and
one decomposition per matrix); other methods re-run their (cheap) per-tensor formulas, and their
global pass in memory, per probe.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io.checkpoints import LoraCheckpoint, TensorSource
from ..merge.config import SafetyMergeConfig
from ..merge.plan import TauSource, delta_getter, open_reference, open_task, validate_plan
from ..methods.base import build_method, canonical_name
from ..methods.finite import FiniteGuard, is_finite, sq_sum
from ..vectors import SafetyVector


class ScaledMerge:
    """The scale-independent part of one merge, held in memory (3 x the covered tensors, fp32)."""

    def __init__(self, config: SafetyMergeConfig, parameter: str, *, progress: bool = True,
                 shared: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
        """`shared`: name -> (theta, tau) already read by another `ScaledMerge` of the same task
        model (`repair` searches several vectors and methods; the task model is read once)."""
        self.config = config
        self.parameter = parameter
        self.device = torch.device(config.device)
        method = build_method(config.method, config.parameters)
        self.task: TensorSource = open_task(config)
        self.ref = open_reference(config, method, self.task)
        self.vector = SafetyVector.from_pretrained(config.safety_vector, revision=config.safety_vector_revision)
        self.plan = validate_plan(config, method, self.task, self.ref, self.vector)
        guard = FiniteGuard(config.allow_non_finite)
        taus = TauSource(self.task, self.ref, self.device)
        get_delta = delta_getter(self.vector, self.device, guard)
        self.names = [n for n in self.plan.names if n in self.plan.merged]
        self.theta: dict[str, torch.Tensor] = {}
        self.tau: dict[str, torch.Tensor | None] = {}
        self.delta: dict[str, torch.Tensor] = {}
        self.dtypes = {o.name: o.dtype for o in self.plan.outputs}
        self.terms: dict[str, Any] = {}
        #: the method scales in closed form from per-matrix terms computed once (EnchTable)
        self.closed_form = type(method).closed_form_scale
        self.method_name = canonical_name(config.method)
        self._tau_sq = 0.0
        self._delta_sq = 0.0
        p: Any = method.params
        self.term_info: dict[str, dict[str, Any]] = {}
        method.use_vector(self.vector)  # as in the engine (EnchTable: its subspace cache)
        norm_all = self.closed_form and getattr(p, "norm_scope", "all") == "all"
        # EnchTable's ||tau|| runs over every tensor of the checkpoint (norm_scope "all")
        names = self.plan.names if norm_all else self.names
        for n in tqdm(names, desc="calibration: reading inputs once", unit="tensor", disable=not progress):
            covered = n in self.plan.merged
            if shared is not None and n in shared and (shared[n][1] is not None or not method.needs_reference):
                theta: torch.Tensor | None = shared[n][0]
                tau = shared[n][1] if method.needs_reference else None
            else:
                theta = self.task.get(n).to(self.device, torch.float32) if (covered or taus.ref is not None) else None
                tau = taus.tau_from(theta, taus.fetch(n), n) if method.needs_reference else None
                if shared is not None and theta is not None and covered:
                    shared[n] = (theta, tau)
            if tau is not None and not is_finite(tau):
                guard.fail(f"tau = task - reference of {n!r} ({self.task.where(n)}) holds NaN/Inf values")
            if self.closed_form and tau is not None:
                self._tau_sq += sq_sum(tau)
            if not covered:
                continue
            assert theta is not None
            d = get_delta(n)
            self.theta[n], self.tau[n], self.delta[n] = theta, tau, d
            if self.closed_form:
                self._delta_sq += sq_sum(d)
                found = method.scale_terms(n, tau, d)
                if found is not None:
                    self.terms[n], self.term_info[n] = found

    @property
    def norm_ratio(self) -> float:
        """||tau|| / ||Delta_s|| (EnchTable's alpha per unit beta)."""
        return (self._tau_sq ** 0.5) / max(self._delta_sq ** 0.5, 1e-300)

    def merged(self, scale: float, method_name: str | None = None, parameter: str | None = None,
               parameters: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The merged covered tensors (in the output dtype) at `scale`, and a summary. With
        `method_name` (and its `parameter`, fixed `parameters`), another method over the same
        tensors (`repair`; EnchTable's terms exist only when this merge was opened for it)."""
        name = method_name or self.config.method
        par = parameter or self.parameter
        fixed = self.config.parameters if parameters is None else parameters
        params = {**fixed, par: int(scale) if par == "num_proj_layers" else scale}
        method = build_method(name, params)
        out: dict[str, torch.Tensor] = {}
        if type(method).closed_form_scale:
            if method.name != self.method_name:
                raise ConfigError(f"ScaledMerge: {method.name} probes need a merge opened for {method.name} (its per-matrix terms)")
            ws: list[float] = []
            for n in self.names:
                merged, w = method.merge_with_terms(self.theta[n], self.delta[n], self.terms.get(n), self.norm_ratio)
                if w is not None:
                    ws.append(w)
                out[n] = self._cast(n, merged)
            return out, method.closed_form_summary(self.norm_ratio, ws)
        if method.wants_global_pass():
            for n in self.names:
                method.observe(n, self.tau[n], self.delta[n])
            method.finish_global()
        for n in self.names:
            method.theta_owned = False
            out[n] = self._cast(n, method.merge_tensor(n, self.theta[n], self.tau[n], self.delta[n]))
        return out, method.summary()

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        from ..io.safetensors_stream import DTYPE_TAGS

        return t.to("cpu").to(DTYPE_TAGS[self.dtypes[name]])

    def load_model(self, tokenizer: bool = True) -> tuple[Any, Any, dict[str, torch.Tensor]]:
        """(model, tokenizer, its state dict by checkpoint name) of the unpatched task model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..errors import ConfigError

        base_path = self.task.base.path if isinstance(self.task, LoraCheckpoint) else self.task.path
        if base_path is None:
            raise ConfigError("calibration needs the task model's files (config and tokenizer) on disk")
        auto: Any = AutoModelForCausalLM
        model = auto.from_pretrained(str(base_path), dtype=torch.float32).to(self.device).eval()
        tok = None
        if tokenizer:
            dirs = [self.task.adapter_dir, base_path] if isinstance(self.task, LoraCheckpoint) else [base_path]
            for d in dirs:
                try:
                    tok = AutoTokenizer.from_pretrained(str(d))
                    break
                except (OSError, ValueError):
                    continue
            if tok is None:
                raise ConfigError(f"calibration generates with the task model: no tokenizer in {', '.join(map(str, dirs))}")
        state = dict(model.state_dict())
        if isinstance(self.task, LoraCheckpoint):  # the task model is base + adapter
            with torch.no_grad():
                for n in self.task:
                    if self.task.delta(n) is not None and n in state:
                        state[n].copy_(self.task.get(n))
        return model, tok, state

    def final_method(self, scale: float) -> Any:
        """The method for the final streaming merge at `scale` (a closed-form method reuses its terms)."""
        params = {**self.config.parameters, self.parameter: int(scale) if self.parameter == "num_proj_layers" else scale}
        return build_method(self.config.method, params).with_terms(self.terms, self.term_info)

    def close(self) -> None:
        self.task.close()
        if self.ref is not None and self.ref is not getattr(self.task, "base", None):
            self.ref.close()
        self.vector.close()


def with_parameter(config: SafetyMergeConfig, parameter: str, value: float) -> SafetyMergeConfig:
    params = {**config.parameters, parameter: int(value) if parameter == "num_proj_layers" else value}
    return dataclasses.replace(config, parameters=params, calibration=None)
