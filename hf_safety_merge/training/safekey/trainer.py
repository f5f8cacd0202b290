"""SafeKeyTrainer: `SFTTrainer` plus the dual-path head and query-mask losses on a schedule."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import TrainerCallback
from trl import SFTTrainer

from ...errors import ConfigError
from ..sharding import ShardedTrainingMixin
from .collator import SafeKeyDataCollator, build_qmm_inputs
from .config import (
    HEADS_FILE,
    SafeKeyConfig,
    resolve_qmm_mode,
)
from .data import (
    SAFEKEY_COLUMNS,
    check_safekey_columns,
    prepare_safekey_dataset,
)
from .heads import DualPathSafetyHead

logger = logging.getLogger(__name__)


@dataclass
class QMMOutput:
    """Result of the query-masked pass: `loss` (mean cross-entropy over the K tokens of the batch),
    `logprobs` `(B, n)` (log-probability of the target at each kept position) and `targets`
    `(B, n)` (-100 where a row has no K token there)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    targets: torch.Tensor

    @property
    def token_logprobs(self) -> torch.Tensor:
        """The log-probability of each K token, row by row, in order."""
        return self.logprobs[self.targets != -100]

    @property
    def rows(self) -> torch.Tensor:
        """The batch row of each entry of `token_logprobs`."""
        return (self.targets != -100).nonzero()[:, 0]




# -- the trainer ----------------------------------------------------------------------------------------


def _longest_row(dataset: Any) -> int:
    """Length of the longest `input_ids` row (from the Arrow table, without reading the rows)."""
    try:
        import pyarrow.compute as pc

        if getattr(dataset, "_indices", None) is None:
            return int(pc.max(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)
    except Exception:  # an unusual backing store: read the column instead
        pass
    return max((len(x) for x in dataset["input_ids"]), default=0)


class _EpochCallback(TrainerCallback):
    """Records the number of optimiser steps per epoch when training starts (for the schedule), and
    zeroes the heads' gradients after every optimiser step."""

    def __init__(self, trainer: SafeKeyTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        dl = kwargs.get("train_dataloader")
        try:
            n = len(dl) if dl is not None else None
        except TypeError:
            n = None
        if n is None:
            self.trainer._safekey_steps_per_epoch = None
            if args.safekey_last_k_epochs is not None:
                logger.warning("SafeKey: the training data has no length; the auxiliary losses are on from the first step")
            return
        ga = max(1, args.gradient_accumulation_steps)
        self.trainer._safekey_steps_per_epoch = max(n // ga + int(n % ga > 0), 1)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # `Trainer` zeroes the model's gradients after each optimiser step (`model.zero_grad()`); the
        # heads sit outside the model, so theirs are zeroed here, or they would add up over steps.
        self.trainer.safekey_heads.zero_grad(set_to_none=True)
        self.trainer._safekey_heads_synced = False  # (a skipped fp16 step never ran the optimiser's pre-hook)


class SafeKeyTrainer(ShardedTrainingMixin, SFTTrainer):
    """`SFTTrainer` plus SafeKey's dual-path safety head and query-mask modelling losses.

    Takes the same arguments as [`~trl.SFTTrainer`] with a [`SafeKeyConfig`]. The training data is
    either prepared rows (`input_ids`, `labels` and the `safekey_*` columns of
    :func:`prepare_safekey_dataset`) or raw records with `prompt`, `response` and `label` columns
    (prepared on the fly with the trainer's tokenizer and `max_length`). `heads=` passes a
    :class:`DualPathSafetyHead` (e.g. loaded from an earlier run) instead of fresh ones.

    Logged metrics (through TRL's `_metrics`, averaged over the logging window, `eval_` prefixed in
    evaluation): `safekey/sft_loss`, `safekey/head_loss`, `safekey/head_accuracy` (both heads; `_u`
    and `_xu` each), `safekey/qmm_loss` and `safekey/aux_active` (1 when the auxiliary losses are in
    the training loss; TRL's `loss` is then the total). The evaluation loss is `L_SFT` alone (comparable to `SFTTrainer`); the auxiliary metrics
    are computed in evaluation whatever the schedule.
    """

    args: SafeKeyConfig
    sharding_method = "SafeKey"
    supports_fsdp2 = False  # refused at start-up: see hf_safety_merge.training.sharding
    #: the QMM mode in use: `safekey_qmm_mode` with "auto" resolved for the model (see :func:`resolve_qmm_mode`)
    safekey_qmm_mode: str

    def __init__(self, *args: Any, heads: DualPathSafetyHead | None = None, **kwargs: Any) -> None:
        cfg = kwargs.get("args", args[1] if len(args) > 1 else None)
        if cfg is not None and not isinstance(cfg, SafeKeyConfig):
            raise ConfigError(f"SafeKeyTrainer needs a SafeKeyConfig as args, got {type(cfg).__name__}")
        if cfg is None:
            raise ConfigError("SafeKeyTrainer needs args=SafeKeyConfig(...)")
        self._refuse_early(cfg)
        user_collator = kwargs.get("data_collator", args[2] if len(args) > 2 else None)
        if user_collator is not None and not isinstance(user_collator, SafeKeyDataCollator):
            raise ConfigError(f"SafeKeyTrainer needs a SafeKeyDataCollator (or none), got {type(user_collator).__name__}")
        super().__init__(*args, **kwargs)
        self._setup_sharding()  # FSDP and ZeRO-3 are refused here, before any training
        cfg = self.args
        if cfg.safekey_clip_heads_with_model and self.is_deepspeed_enabled:
            raise ConfigError(
                "safekey_clip_heads_with_model is not supported under DeepSpeed (its engine clips the model's gradients "
                "itself, without the heads); launch with DDP or set safekey_clip_heads_with_model false"
            )
        self._safekey_heads_synced = False
        if not isinstance(self.data_collator, SafeKeyDataCollator):
            self.data_collator = SafeKeyDataCollator(
                pad_token_id=self._tokenizer.pad_token_id, pad_to_multiple_of=cast("int | None", cfg.pad_to_multiple_of)
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        text_config = base.config.get_text_config()
        model_type = getattr(base.config, "model_type", None)  # the model that runs (a multimodal wrapper is not its text model)
        if cfg.safekey_qmm_weight > 0:
            self.safekey_qmm_mode = resolve_qmm_mode(cfg.safekey_qmm_mode, model_type)
            logger.info("SafeKey: query-mask modelling in %r mode (model type %r)", self.safekey_qmm_mode, model_type)
        else:  # no QMM pass: nothing to refuse
            self.safekey_qmm_mode = "masked" if cfg.safekey_qmm_mode == "auto" else cfg.safekey_qmm_mode
        self.data_collator.emit_qmm = cfg.safekey_qmm_weight > 0
        self.data_collator.qmm_mode = self.safekey_qmm_mode
        if self._skip_prepare_dataset and self.train_dataset is not None:
            from trl.data_utils import get_dataset_column_names

            check_safekey_columns(get_dataset_column_names(self.train_dataset), "train")

        hidden = int(text_config.hidden_size)
        if heads is None:
            heads = DualPathSafetyHead(hidden)
            heads.reset_parameters(cfg.seed, float(getattr(text_config, "initializer_range", 0.02) or 0.02))
        elif heads.hidden_size != hidden:
            raise ConfigError(f"heads= has hidden size {heads.hidden_size}, the model {hidden}")
        self.safekey_heads: DualPathSafetyHead = heads.to(device=self.args.device, dtype=torch.float32)
        self._safekey_backbone: nn.Module = base.base_model
        self._safekey_capture = False
        self._safekey_hidden: torch.Tensor | None = None
        self._safekey_backbone.register_forward_hook(self._capture_hidden)
        self._safekey_steps_per_epoch: int | None = None
        self.add_callback(_EpochCallback(self))

    # -- data -------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, packing: bool, formatting_func: Any, dataset_name: str) -> Any:
        from trl.data_utils import get_dataset_column_names

        if formatting_func is not None:
            raise ConfigError("SafeKeyTrainer does not take a formatting_func; give (prompt, response, label) records")
        cols = get_dataset_column_names(dataset)
        if cols is not None and "input_ids" not in cols:
            a: SafeKeyConfig = args
            dataset = prepare_safekey_dataset(
                dataset, self._tokenizer, max_length=a.max_length, prompt_key=a.safekey_prompt_key,
                response_key=a.safekey_response_key, label_key=a.safekey_label_key,
                max_u_sentences=a.safekey_max_u_sentences, overlap_threshold=a.safekey_overlap_threshold,
            )
            cols = get_dataset_column_names(dataset)
        check_safekey_columns(cols, dataset_name)
        if args.max_length is not None and hasattr(dataset, "__len__") and len(dataset) > 0:
            longest = _longest_row(dataset)
            if longest > args.max_length:
                raise ConfigError(
                    f"the {dataset_name} data set has rows of {longest} tokens, more than max_length={args.max_length}; "
                    "prepare it with prepare_safekey_dataset(..., max_length=max_length)"
                )
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", *SAFEKEY_COLUMNS]  # type: ignore[assignment]

    # -- optimiser, saving ------------------------------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        opt = super().create_optimizer(model)
        raw = getattr(opt, "optimizer", opt)
        present = {id(p) for g in raw.param_groups for p in g["params"]}
        heads = self.safekey_heads
        if self.args.safekey_head_weight > 0 and not any(id(p) in present for p in heads.parameters()):
            lr = self.args.safekey_head_learning_rate
            lr = self.args.learning_rate if lr is None else lr
            weights = [heads.u_head.weight, heads.xu_head.weight]
            biases = [heads.u_head.bias, heads.xu_head.bias]
            raw.add_param_group({"params": weights, "weight_decay": self.args.weight_decay, "lr": lr})
            raw.add_param_group({"params": biases, "weight_decay": 0.0, "lr": lr})
            raw.register_step_pre_hook(self._sync_head_grads)
        return opt

    def _average_head_grads(self) -> None:
        """Average the heads' gradients over processes (the heads sit outside DDP)."""
        grads = [p.grad for p in self.safekey_heads.parameters() if p.grad is not None]
        if grads and self.accelerator.num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.accelerator.num_processes
            i = 0
            for g in grads:
                g.copy_(flat[i : i + g.numel()].view_as(g))
                i += g.numel()

    def _sync_head_grads(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before each optimiser step: average the heads' gradients over processes and clip them to
        `max_grad_norm` on their own, unless `_clip_grad_norm` already did both (with the model's)."""
        if self._safekey_heads_synced:
            self._safekey_heads_synced = False
            return
        self._average_head_grads()
        if not self.args.safekey_clip_heads_with_model and self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.safekey_heads.parameters()), self.args.max_grad_norm)

    def _clip_grad_norm(self, model: Any) -> Any:
        """`Trainer`'s clip of the model's gradients; with `safekey_clip_heads_with_model`, one global
        norm over the model's and the (process-averaged) heads' gradients and one scale for all of
        them, as the reference's DeepSpeed engine clips its model, heads included."""
        if not (self.args.safekey_clip_heads_with_model and self.args.safekey_head_weight > 0):
            return super()._clip_grad_norm(model)
        self._average_head_grads()
        self._safekey_heads_synced = True  # the optimiser's pre-hook must not average or clip them again
        params = [*model.parameters(), *self.safekey_heads.parameters()]
        return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

    def save_safekey_heads(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the heads as `safekey_heads.safetensors` into `path` (default: `output_dir`)."""
        target = path if path is not None else self.args.output_dir
        assert target is not None
        return self.safekey_heads.save(target)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if (self.args.safekey_save_heads or _internal_call) and self.args.should_save:
            self.save_safekey_heads(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        p = Path(resume_from_checkpoint) / HEADS_FILE
        if p.is_file():
            loaded = DualPathSafetyHead.load(p)
            self.safekey_heads.load_state_dict(loaded.state_dict())
        else:
            logger.warning("SafeKey: %s has no %s; the heads start afresh", resume_from_checkpoint, HEADS_FILE)

    # -- loss -------------------------------------------------------------------------------------------

    def _capture_hidden(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._safekey_capture and self._safekey_hidden is None:  # the first (gradient-carrying) pass
            h = getattr(output, "last_hidden_state", None)
            self._safekey_hidden = h if h is not None else output[0]

    def safekey_aux_active(self) -> bool:
        """Are the auxiliary losses in the training loss at the current step (see `safekey_last_k_epochs`)?"""
        k = self.args.safekey_last_k_epochs
        spe = self._safekey_steps_per_epoch
        if k is None or spe is None or self.state.max_steps <= 0:
            return True
        start = max(0, self.state.max_steps - math.ceil(k * spe - 1e-9))
        return self.state.global_step >= start

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of `Trainer.training_step`: is the returned loss already normalised over the whole
        accumulated step (so that `training_step` will not divide it by the accumulation steps)?"""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def qmm_forward(self, model: nn.Module, inputs: dict[str, Any], *, logits: bool = False, mode: str | None = None) -> Any:
        """The query-masked forward pass (see :func:`build_qmm_inputs` for the two modes).

        Uses the collator's `qmm_*` inputs when they are there and of the requested `mode` (default:
        the trainer's resolved `safekey_qmm_mode`), else builds them from the batch. `logits=False`: a :class:`QMMOutput`;
        only the positions predicting K go through the LM head (`logits_to_keep`), and nothing waits
        on the device. `logits=True`: the model's plain output on the QMM inputs (full logits, for
        inspection; position `j` of row `r` is token `j`, or `query_len[r] + j` in compact mode).
        """
        mode = self.safekey_qmm_mode if mode in (None, "auto") else mode
        collated = getattr(self.data_collator, "qmm_mode", None) == mode
        if not (collated and "qmm_input_ids" in inputs):
            inputs = {**inputs, **build_qmm_inputs(inputs["input_ids"], inputs["attention_mask"], inputs["safekey_query_len"],
                                                   inputs["safekey_k_mask"], mode, self._tokenizer.pad_token_id or 0)}
        mask = inputs["qmm_attention_mask"]
        kw = dict(input_ids=inputs["qmm_input_ids"], attention_mask=mask, position_ids=inputs["qmm_position_ids"], use_cache=False)
        if logits:
            return model(**kw)
        positions, targets = inputs["qmm_logit_positions"], inputs["qmm_targets"]
        lg = model(**kw, logits_to_keep=positions).logits
        if lg.dim() != 3 or lg.shape[1] != positions.shape[0]:  # a model without `logits_to_keep`
            lg = model(**kw).logits[:, positions]
        nll = nn.functional.cross_entropy(lg.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
        nll = nll.view(targets.shape)
        loss = nll.sum() / (targets != -100).sum().clamp(min=1)
        return QMMOutput(loss=loss, logprobs=-nll, targets=targets)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        extras = {k: inputs.pop(k) for k in list(inputs) if k.startswith(("safekey_", "qmm_"))}
        if "safekey_u_span" not in extras:
            raise ConfigError("SafeKeyTrainer got a batch without SafeKey fields; use SafeKeyDataCollator")
        cfg = self.args
        mode = "train" if model.training else "eval"
        train = mode == "train" and torch.is_grad_enabled()
        active = self.safekey_aux_active() if mode == "train" else True
        use_head = active and cfg.safekey_head_weight > 0
        use_qmm = active and cfg.safekey_qmm_weight > 0

        # The query-masked pass goes first: its kernels are queued before SFTTrainer's metrics wait
        # on the device, and its (small) backward comes last, behind the main pass's.
        qmm_loss = self.qmm_forward(model, {**inputs, **extras}).loss if use_qmm else None
        self._safekey_capture = use_head
        self._safekey_hidden = None
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._safekey_capture = False
        loss, outputs = result if return_outputs else (result, None)
        hidden, self._safekey_hidden = self._safekey_hidden, None
        steps = max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1)) if train else 1
        scale = 1.0 / steps if train and self._loss_is_scaled_for_ga(num_items_in_batch) else 1.0

        metrics: dict[str, torch.Tensor] = {"safekey/sft_loss": loss.detach().float() / (scale if train else 1.0)}
        if mode == "train":
            metrics["safekey/aux_active"] = torch.tensor(float(active), device=loss.device)
        if use_head:
            if hidden is None:
                raise RuntimeError("SafeKey: the final hidden states were not captured (unsupported model wrapper)")
            h = hidden.detach() if cfg.safekey_detach_head_inputs else hidden
            with torch.autocast(device_type=h.device.type, enabled=False):
                head_logits = self.safekey_heads(h, extras["safekey_u_span"])
                head_loss = DualPathSafetyHead.loss(head_logits, extras["safekey_labels"], float(cfg.safekey_head_theta))
            if train:
                loss = loss + (cfg.safekey_head_weight * scale) * head_loss.to(loss.dtype)
            with torch.no_grad():
                y = extras["safekey_labels"].to(head_logits.device)[:, None] >= 0.5
                correct = ((torch.sigmoid(head_logits) > cfg.safekey_head_accuracy_threshold) == y).float().mean(0)
                metrics["safekey/head_loss"] = head_loss.detach().float()
                metrics["safekey/head_accuracy"] = correct.mean()
                metrics["safekey/head_accuracy_u"] = correct[0]
                metrics["safekey/head_accuracy_xu"] = correct[1]
        if qmm_loss is not None:
            if train:
                loss = loss + (cfg.safekey_qmm_weight * scale) * qmm_loss.to(loss.dtype)
            metrics["safekey/qmm_loss"] = qmm_loss.detach().float()
        if metrics:  # one gather and one device sync for all of them
            stacked = torch.stack([v.reshape(()).float().to(loss.device) for v in metrics.values()])
            values = self.accelerator.gather_for_metrics(stacked[None]).mean(0).tolist()
            for key, v in zip(metrics, values, strict=True):
                self._metrics[mode][key].append(v)
        return (loss, outputs) if return_outputs else loss

    def safekey_summary(self) -> dict[str, Any]:
        """The last logged values of the SafeKey metrics (for scripts)."""
        out: dict[str, Any] = {}
        for h in self.state.log_history:
            for k, v in h.items():
                if k.startswith("safekey/"):
                    out[k] = v
        return json.loads(json.dumps(out))
