"""AsFTTrainer: `SFTTrainer` plus `lambda * sum_l ||(I - C_l) B_l A_l||_F^2` on the LoRA weights.

Loss per optimiser step: `L = L_task + lambda * sum_l ||(I - C_l) B_l A_l||_F^2`, where
`C_l = V_l V_l^T / ||V_l||_F` (`V_l = W_aligned - W_base`, Safe LoRA's matrix) or a rank-`k`
projector, for every LoRA-adapted module `l`. See :mod:`hf_safety_merge.training.asft.projector` for the
anchors and the cheap exact form of the penalty.

Gradient accumulation and DDP: the penalty depends on the weights only, so it is identical for
every micro-batch of an optimiser step and on every rank. `AsFTTrainer` adds
`lambda * P / G` to each of the `G` micro-batches' losses (after whatever `Trainer` does to the
task loss), so the accumulated gradient is `lambda * grad P` per optimiser step, whatever `G`; DDP
averages identical penalty gradients across ranks, leaving them unchanged. The task loss itself is
normalised exactly as `SFTTrainer` does (by the number of label tokens over the whole step and
all ranks).
"""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import torch
from trl import SFTTrainer

from ...errors import ConfigError
from ..sharding import ShardedTrainingMixin, chunk_rows, row_shard
from .anchors import AlignmentAnchors
from .config import AsFTConfig
from .peft_mixin import (
    AnchorBinding,
    anchored_penalty,
    bind_anchors,
    find_lora_targets,
    lora_targets_summary,
    resolve_anchors,
)
from .penalty import is_sharded, sharded_penalty_terms

logger = logging.getLogger(__name__)


class AsFTTrainer(ShardedTrainingMixin, SFTTrainer):
    """`SFTTrainer` plus AsFT's safety-anchored regulariser on the LoRA weights.

    Takes the same arguments as [`~trl.SFTTrainer`] (model, `peft_config`, datasets, ...) with an
    [`AsFTConfig`], plus `anchors=` to pass an :class:`AlignmentAnchors` object directly. The
    model must carry PEFT LoRA layers after construction (pass `peft_config`, or a `PeftModel`).

    Logged metrics (through TRL's `_metrics`, averaged over the logging window):
    `asft/penalty` (`sum ||(I - C) B A||_F^2`, unweighted), `asft/weighted_penalty`
    (`lambda * penalty`) and `asft/penalty_share` (its share of the total training loss).

    Engines: one process, DDP and FSDP2 (the anchors are then sharded like the LoRA weights they
    pair with: each process keeps `1 / world` of them; see :mod:`hf_safety_merge.training.sharding`
    and :func:`~hf_safety_merge.training.asft.penalty.sharded_penalty_terms`) and DeepSpeed ZeRO-3
    (the penalty runs as a module DeepSpeed gathers the LoRA weights for, anchors sharded by rows:
    :mod:`hf_safety_merge.training.asft.zero3`). FSDP1 is refused at start-up.
    """

    args: AsFTConfig
    sharding_method = "AsFT"
    supports_fsdp2 = True
    supports_zero3 = True

    def __init__(self, *args: Any, anchors: AlignmentAnchors | None = None, **kwargs: Any) -> None:
        given = kwargs.get("args", args[1] if len(args) > 1 else None)
        if given is not None:
            self._refuse_early(given)
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, AsFTConfig):
            raise ConfigError(f"AsFTTrainer needs an AsFTConfig as args, got {type(self.args).__name__}")
        cfg = self.args
        assert self.model is not None
        self._setup_sharding()
        if self.training_engine == "fsdp2" and cfg.fp16:
            raise ConfigError("AsFT under FSDP2: fp16 with loss scaling is not supported; use bf16 (or float32)")
        self._zero3_penalty: Any = None
        #: what the first training step saw of the sharding (for logs, summaries and tests)
        self.asft_sharding: dict[str, Any] = {"engine": self.training_engine}
        targets = find_lora_targets(self.model, None, cfg.asft_target_modules)
        if not targets:
            raise ConfigError(
                "AsFTTrainer found no LoRA linear layers in the model"
                + (f" matching asft_target_modules={cfg.asft_target_modules}" if cfg.asft_target_modules else "")
                + "; pass peft_config=LoraConfig(...) or a PeftModel"
            )
        aligned = cfg.asft_aligned_model
        if aligned is None and anchors is None:
            from .peft_mixin import _default_aligned

            aligned = _default_aligned(self.model)
        cache = cfg.asft_anchors_path
        anchors_arg: Any = anchors
        cache_path: str | None = None
        if anchors is None and cache is not None:
            if cfg.asft_base_model is None:
                anchors_arg = cache  # precomputed: a local file or folder, or a Hub repo
                aligned = cfg.asft_aligned_model  # checked only against an aligned model named here
            else:
                # a local cache (file, or folder holding asft_anchors.safetensors, possibly empty):
                # loaded when it matches this run, else rebuilt or refused (asft_rebuild_stale_anchors)
                cache_path = cache
        row_range = None
        if self.training_engine in ("fsdp2", "deepspeed-zero3"):
            # FSDP2 shards every weight on dim 0 over all processes (torch.chunk sizes): read only
            # this process's rows of each anchor from a file (checked against the LoRA shards later).
            rank, world = self.accelerator.process_index, self.accelerator.num_processes

            def row_range(_module: str, total: int) -> tuple[int, int]:
                return chunk_rows(total, rank, world)

        # The main process computes (and caches) first; the others then read the cache.
        with self.accelerator.main_process_first():
            self.asft_anchors: AlignmentAnchors = resolve_anchors(
                targets,
                anchors=anchors_arg,
                aligned=aligned,
                base=cfg.asft_base_model,
                cache_path=cache_path,
                projector=cfg.asft_projector,  # type: ignore[arg-type]
                k=cfg.asft_projector_rank if cfg.asft_projector == "topk" else None,
                dtype=cfg.asft_anchor_dtype,
                aligned_revision=cfg.asft_aligned_revision,
                base_revision=cfg.asft_base_revision,
                on_mismatch="rebuild" if cfg.asft_rebuild_stale_anchors else "error",
                rebuild_hint="set asft_rebuild_stale_anchors=true to recompute it",
                row_range=row_range,
            )
        self.asft_bindings: list[AnchorBinding] = bind_anchors(targets, self.asft_anchors, strict=cfg.asft_strict)
        if is_sharded(self.asft_bindings):
            self._shard_anchors()
        if self.training_engine == "deepspeed-zero3":
            from .zero3 import ZeroPenaltyModule

            # a submodule before DeepSpeed wraps the model, so that DeepSpeed hooks it
            self._zero3_penalty = ZeroPenaltyModule(self.asft_bindings, cfg.asft_include_lora_scaling,
                                                    self.accelerator.process_index, self.accelerator.num_processes)
            self.model.add_module("asft_zero3_penalty", self._zero3_penalty)
            bound = {bnd.target.key: bnd.anchor for bnd in self.asft_bindings}
            self.asft_anchors = AlignmentAnchors(bound, self.asft_anchors.projector, self.asft_anchors.k,
                                                 dict(self.asft_anchors.meta, sharded=True))
        logger.info("AsFT: anchored %s", lora_targets_summary(self.asft_bindings))

    def _shard_anchors(self) -> None:
        """Keep only this process's rows of each bound anchor (FSDP2), dropping whole ones."""
        for bnd in self.asft_bindings:
            sb = row_shard(bnd.target.lora_b, bnd.target.name)
            if sb is not None:
                bnd.anchor_rows(sb.start, sb.stop, bnd.anchor.matrix.device)
        bound = {bnd.target.key: bnd.anchor for bnd in self.asft_bindings}
        self.asft_anchors = AlignmentAnchors(bound, self.asft_anchors.projector, self.asft_anchors.k,
                                             dict(self.asft_anchors.meta, sharded=True))

    def asft_anchor_memory(self) -> dict[str, int]:
        """Bytes of anchors this process holds (`local`) and of the whole anchors (`whole`)."""
        local = whole = 0
        for bnd in self.asft_bindings:
            m = bnd.anchor.matrix
            local += m.numel() * m.element_size()
            whole += bnd.anchor.out_features * int(m.shape[1]) * m.element_size()
        return {"local": local, "whole": whole}

    # -- the schedule -----------------------------------------------------------------------------

    def set_initial_training_values(self, args: Any, dataloader: Any) -> Any:
        values = super().set_initial_training_values(args, dataloader)
        self._asft_steps_per_epoch = int(values[1])  # optimiser steps per epoch, as Trainer counts them
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        gamma = self.args.asft_lr_decay_per_epoch
        if gamma is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        per_epoch = getattr(self, "_asft_steps_per_epoch", None) or max(
            1, math.ceil(num_training_steps / max(1.0, float(self.args.num_train_epochs)))
        )
        if self.args.get_warmup_steps(num_training_steps) > 0:
            logger.warning("AsFT: asft_lr_decay_per_epoch is set: warmup_steps is ignored (the reference has no warmup)")
        opt = optimizer if optimizer is not None else self.optimizer
        assert opt is not None, "create_scheduler needs the optimizer (create_optimizer runs first)"
        # The LR of optimiser step s (0-based) is lr * gamma ** (epoch of s): the same sequence as
        # the reference's StepLR(step_size=1, gamma) stepped after each epoch.
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(gamma) ** (s // per_epoch))
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- the regulariser --------------------------------------------------------------------------

    def _zero3_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Under ZeRO-3: this process's part of each module's penalty (differentiable, through
        DeepSpeed's gathered weights) and the whole per-module penalties (detached)."""
        import torch.distributed as dist

        local = self._zero3_penalty()
        whole = local.detach().clone()
        dist.all_reduce(whole)
        if "anchor_rows" not in self.asft_sharding:
            t = self.asft_bindings[0].target
            w = t.lora_b
            self.asft_sharding.update({
                "world": self.accelerator.num_processes,
                "module": t.name,
                "lora_B": {"ds_status": str(getattr(w, "ds_status", None)), "global_shape": list(getattr(w, "ds_shape", w.shape)),
                           "local_shape": list(w.ds_tensor.shape) if hasattr(w, "ds_tensor") else None,
                           "data_shape_outside_forward": list(w.data.shape)},
                "anchor_rows": list(self.asft_bindings[0].anchor.rows or ()),
                "anchor_bytes": self.asft_anchor_memory(),
            })
        return local, whole

    def _sharded_parts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Under FSDP2: this process's part of the penalty (differentiable) and the whole penalty
        (summed over processes, detached); None when the LoRA weights are not sharded."""
        if not is_sharded(self.asft_bindings):
            return None
        if self.asft_anchors.meta.get("sharded") is not True:
            self._shard_anchors()  # accelerate applied FSDP2 after __init__ (GPU launches)
        if "lora_B" not in self.asft_sharding:
            t = self.asft_bindings[0].target
            sb = row_shard(t.lora_b, t.name)
            assert sb is not None
            lb, la = cast(Any, t.lora_b), cast(Any, t.lora_a)  # DTensors
            self.asft_sharding.update({
                "world": sb.world,
                "module": t.name,
                "lora_B": {"placements": [str(p) for p in lb.placements], "global_shape": list(lb.shape),
                           "local_shape": list(lb.to_local().shape)},
                "lora_A": {"placements": [str(p) for p in la.placements], "global_shape": list(la.shape),
                           "local_shape": list(la.to_local().shape)},
                "anchor_rows": list(self.asft_bindings[0].anchor.rows or ()),
                "anchor_bytes": self.asft_anchor_memory(),
            })
        parts, group = sharded_penalty_terms(self.asft_bindings, self.args.asft_include_lora_scaling)
        import torch.distributed as dist

        local = torch.stack(parts).sum()
        whole = local.detach().clone()
        dist.all_reduce(whole, group=group)
        return local, whole

    def asft_penalty(self) -> torch.Tensor:
        """`sum_l ||(I - C_l) B_l A_l||_F^2` of the current LoRA weights (differentiable; under
        FSDP2 its value only: the training step takes the gradient of each process's part)."""
        if self._zero3_penalty is not None:
            return self._zero3_parts()[1].sum()
        sharded = self._sharded_parts()
        if sharded is not None:
            return sharded[1]
        p = anchored_penalty(self.asft_bindings, self.args.asft_include_lora_scaling)
        if p is None:  # asft_strict=False and nothing bound
            return torch.zeros((), device=self.args.device)
        return p

    def _task_loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of `Trainer.training_step`'s decision: is the loss `compute_loss` returns already
        normalised over the whole accumulated step (so `training_step` will not divide it by the
        number of accumulation steps)?"""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        mode = "train" if model.training else "eval"
        lam = float(self.args.asft_lambda)
        train = mode == "train" and torch.is_grad_enabled()
        scaled = self._task_loss_is_scaled_for_ga(num_items_in_batch)
        steps = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1)) if train else 1

        sharded = self._sharded_parts() if train and lam != 0.0 and self._zero3_penalty is None else None
        if train and lam != 0.0 and self._zero3_penalty is not None:
            # ZeRO-3: one backward (DeepSpeed reduces each weight's gradient once). DeepSpeed
            # averages gradients over the w processes, so the loss carries w x this process's
            # part for the gradient and the whole penalty as its value.
            local_parts, whole_parts = self._zero3_parts()
            w = float(self.accelerator.num_processes)
            local, penalty = local_parts.sum(), whole_parts.sum()
            pen_grad = w * local + (penalty - w * local).detach()
            term = (lam / steps if scaled else lam) * pen_grad.to(loss.dtype)
            loss = loss + term
            term = term.detach()
        elif sharded is not None:
            # FSDP2: each process back-propagates its part of the penalty into its sharded
            # gradients now (the collectives' backward sums the parts' gradients over processes,
            # giving grad P on this process's rows; FSDP2 then adds the task gradient's
            # reduce-scatter to them). The loss carries the whole penalty's value, detached.
            local, penalty = sharded
            (local * (lam / steps)).backward()
            term = (lam / steps if scaled else lam) * penalty.to(loss.dtype)
            loss = loss + term
        elif train and lam != 0.0:
            penalty = self.asft_penalty()
            # Per micro-batch lambda * P / G once Trainer is done scaling: P is the same for the G
            # micro-batches of a step, so they sum to lambda * P per optimiser step.
            term = (lam / steps if scaled else lam) * penalty.to(loss.dtype)
            loss = loss + term
        else:
            with torch.no_grad():
                penalty = self.asft_penalty()
            term = torch.zeros((), device=loss.device, dtype=loss.dtype)

        # Logging: the penalty is identical on every rank; the task loss is averaged over ranks.
        with torch.no_grad():
            task = (loss - term).detach().float()
            if train and not scaled:
                task = task / steps  # what training_step will do; keep both terms in the same units
            task = self.accelerator.gather_for_metrics(task.reshape(1)).mean()
            term_f = term.detach().float() / (1.0 if (scaled or not train) else steps)
            pen = float(penalty.detach())
            denom = float(task) + float(term_f)
            self._metrics[mode]["asft/penalty"].append(pen)
            self._metrics[mode]["asft/weighted_penalty"].append(lam * pen)
            self._metrics[mode]["asft/penalty_share"].append(float(term_f) / denom if denom != 0 else 0.0)
        return (loss, outputs) if return_outputs else loss

    def asft_drift(self) -> dict[str, float]:
        """Per module `||(I - C) s B A||_F` of the current weights (see `SafetyPeftMixin`)."""
        from .projector import basin_components

        out = {}
        if self._zero3_penalty is not None:  # ZeRO-3: every process must call this (collectives)
            with torch.no_grad():
                self._zero3_penalty.include_lora_scaling, keep = True, self._zero3_penalty.include_lora_scaling
                try:
                    total = self._zero3_parts()[1].double()
                finally:
                    self._zero3_penalty.include_lora_scaling = keep
            return {bnd.target.name: float(v.clamp_min(0).sqrt()) for bnd, v in zip(self.asft_bindings, total)}
        if is_sharded(self.asft_bindings):  # FSDP2: every process must call this (collectives)
            import torch.distributed as dist

            with torch.no_grad():
                parts, group = sharded_penalty_terms(self.asft_bindings, include_lora_scaling=True)
                total = torch.stack(parts).double()
                dist.all_reduce(total, group=group)
            return {bnd.target.name: float(v.clamp_min(0).sqrt()) for bnd, v in zip(self.asft_bindings, total)}
        for bnd in self.asft_bindings:
            t = bnd.target
            anchor = bnd.anchor_on(t.lora_b.device)
            out[t.name] = basin_components(
                t.lora_b.detach().to(anchor.matrix.dtype), t.lora_a.detach().to(anchor.matrix.dtype), anchor, t.scaling
            )["off_basin"]
        return out
