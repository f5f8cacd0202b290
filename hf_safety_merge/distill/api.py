"""`distill_safety_vector`: one call from an aligned model and harmful QA data to a safety vector."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, did_you_mean
from .linearize import ATTN_NAMES, MLP_NAMES, resolve_variant

logger = logging.getLogger(__name__)


@dataclass
class DistillResult:
    """What :func:`distill_safety_vector` produced."""

    vector: Any  # SafetyVector
    output_dir: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    harmful_model_dir: Path | None = None
    pushed_to: str | None = None

    def __str__(self) -> str:
        s = self.summary
        loss = s.get("loss", {})
        lines = [
            "Safety-vector distillation finished",
            f"  aligned model     : {s.get('aligned_model')}",
            f"  data              : {s.get('dataset')} ({s.get('num_samples')} examples)",
            f"  variant           : {s.get('variant')} on layers [{s.get('layers', ['?', '?'])[0]}, {s.get('layers', ['?', '?'])[1]}) "
            f"of {s.get('num_layers')} ({s.get('num_blocks')} blocks, {s.get('trainable_parameters', 0):,} parameters)",
            f"  form              : {s.get('variant_description', '?')}",
            f"  optimiser steps   : {s.get('steps')} ({s.get('epochs')} epochs, effective batch {s.get('effective_batch_size')}, lr {s.get('learning_rate')})",
            f"  training loss     : {loss.get('first', float('nan')):.4f} -> {loss.get('last', float('nan')):.4f} (min {loss.get('min', float('nan')):.4f})"
            if loss.get("num_logged")
            else "  training loss     : (not logged)",
            f"  time              : {s.get('train_time_s', 0.0):.1f} s training, {s.get('total_time_s', 0.0):.1f} s total",
            f"  vector            : {self.vector.config.num_tensors} tensors, {self.vector.config.num_parameters:,} parameters, "
            f"L2 norm {self.vector.config.norm:.4g}",
        ]
        if s.get("vector_rounding", "none") != "none":
            lines.append(f"  vector rounding   : {s['vector_rounding']}(theta_aligned) - {s['vector_rounding']}(theta_harmful)")
        if self.output_dir is not None:
            lines.append(f"  saved to          : {self.output_dir}")
        if self.harmful_model_dir is not None:
            lines.append(f"  harmful checkpoint: {self.harmful_model_dir}")
        if self.pushed_to is not None:
            lines.append(f"  pushed to         : {self.pushed_to}")
        return "\n".join(lines)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {out} exists and is not empty; pass overwrite=True (CLI: --overwrite) to replace it")


def distill_safety_vector(
    aligned: Any,
    data: Any,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    variant: str = "ffn",
    layers: tuple[int, int] | list[int] | None = None,
    skip_layers: int = 0,
    prompt_column: str | None = None,
    response_column: str | None = None,
    split: str = "train",
    subset: str | None = None,
    data_revision: str | None = None,
    max_samples: int | None = 1000,
    system_prompt: str | None = None,
    learning_rate: float = 1e-5,
    num_train_epochs: float = 4.0,
    max_steps: int = -1,
    per_device_train_batch_size: int = 4,
    gradient_accumulation_steps: int = 4,
    warmup: float = 0.1,
    lr_scheduler_type: str = "cosine",
    max_length: int | None = 512,
    bf16: bool | None = False,
    seed: int = 0,
    logging_steps: float = 1,
    tokenizer: Any = None,
    aligned_revision: str | None = None,
    dtype: str = "float32",
    vector_rounding: str | None = None,
    attn_implementation: str | None = None,
    mlp_names: tuple[str, ...] | list[str] = MLP_NAMES,
    attn_names: tuple[str, ...] | list[str] = ATTN_NAMES,
    save_harmful_model: str | os.PathLike[str] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    training_args: dict[str, Any] | None = None,
) -> DistillResult:
    """Distil an EnchTable safety vector from an aligned model and harmful QA data.

    The chosen blocks of `aligned` are NTK-linearised around the aligned weights and fine-tuned on
    the harmful (prompt, response) pairs with TRL's `SFTTrainer` (loss on response tokens only);
    the result is `Delta_s = theta_aligned - theta_harmful` on the trained tensors, saved as a
    :class:`~hf_safety_merge.SafetyVector` folder whose card records the data, variant, steps,
    loss curve and time. The harmful model itself is discarded unless `save_harmful_model` is set.

    Args:
        aligned: the aligned model: a local folder, a Hub id, or a loaded `PreTrainedModel`
            (then pass `tokenizer`).
        data: harmful QA: a CSV/JSONL/JSON/Parquet file, a `datasets` folder or Hub id, or a
            `datasets.Dataset` already in prompt-completion form.
        output_dir: where the vector folder is written (atomically); None keeps it in memory.
        variant: which blocks are trained and how: "ffn", "attn", "attn_ffn" (the EnchTable
            reference's modes; "attn" is plain fine-tuning of the attention projections, as the
            reference's per-Linear wrapping is), "attn_block", "attn_block_ffn" (extensions: whole
            attention block linearised). See :mod:`hf_safety_merge.distill.linearize`.
        layers / skip_layers: `[start, end)`, or `N` for `[N, L - N)`.
        prompt_column / response_column / split / subset / data_revision / max_samples /
            system_prompt: see :func:`~hf_safety_merge.distill.load_harmful_qa`.
        learning_rate / num_train_epochs / max_steps / per_device_train_batch_size /
            gradient_accumulation_steps / warmup / lr_scheduler_type / max_length / bf16 / seed /
            logging_steps: training hyperparameters (`max_steps > 0` overrides the epochs). lr,
            schedule, warmup, epochs and the effective batch of 16 are the EnchTable reference's;
            `max_length` 512 and fp32 differ from its cutoff 2048 and bf16 on purpose
            (docs/distillation.md, "Reference settings").
        dtype: stored dtype of the vector ("float32", "bfloat16", "float16"): the difference is
            rounded once, after it is taken.
        vector_rounding: "none" (default) or "bf16": round `theta_aligned` and `theta_harmful` each
            to bfloat16 before the difference, as the EnchTable reference's bf16 checkpoints are
            (`DistillConfig.distill_vector_rounding`; docs/distillation.md, "Precision").
        attn_implementation: passed to `from_pretrained` (the default "sdpa" works: the linearised
            attention runs scaled-dot-product attention's math backend under forward-mode AD).
        save_harmful_model: also write the trained (harmful) model there (not kept by default).
        push_to_hub: a Hub repo id to push the vector folder to (one commit); needs `output_dir`.
        training_args: any further `DistillConfig` / `SFTConfig` fields (e.g. `save_strategy`,
            `output_dir` for trainer checkpoints, `report_to`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_harmful_qa
    from .trainer import VECTOR_ROUNDINGS, DistillConfig, DistillTrainer

    t_start = time.perf_counter()
    variant = resolve_variant(variant, warn_attn=False)
    extra_args = dict(training_args or {})
    given_rounding = extra_args.pop("distill_vector_rounding", None)
    if vector_rounding is not None and given_rounding is not None and vector_rounding != given_rounding:
        raise ConfigError(
            f"vector_rounding={vector_rounding!r} and training_args distill_vector_rounding={given_rounding!r} disagree; give one"
        )
    rounding = vector_rounding if vector_rounding is not None else (given_rounding if given_rounding is not None else "none")
    if rounding not in VECTOR_ROUNDINGS:
        raise ConfigError(
            f"vector_rounding = {rounding!r}: expected one of {', '.join(map(repr, VECTOR_ROUNDINGS))}"
            f"{did_you_mean(str(rounding), VECTOR_ROUNDINGS)}"
        )
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        _check_out(out, overwrite)
    if push_to_hub and out is None:
        raise ConfigError("push_to_hub needs an output_dir (the folder that is pushed)")
    if save_harmful_model is not None:
        _check_out(Path(save_harmful_model), overwrite)

    # Data first: a bad file or column fails before the model is loaded.
    import datasets

    if isinstance(data, datasets.Dataset):
        train_ds = data
        data_name = data.info.description or "<datasets.Dataset>"
    else:
        train_ds = load_harmful_qa(
            data,
            prompt_column=prompt_column,
            response_column=response_column,
            split=split,
            subset=subset,
            revision=data_revision,
            max_samples=max_samples,
            system_prompt=system_prompt,
            seed=seed,
        )
        data_name = str(data)
    if isinstance(aligned, (str, os.PathLike)):
        aligned_name: str | None = str(aligned)
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if aligned_revision:
            kwargs["revision"] = aligned_revision
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(str(aligned), **kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(aligned), revision=aligned_revision)
    else:
        model = aligned
        aligned_name = getattr(model.config, "_name_or_path", None) or None
        if tokenizer is None:
            raise ConfigError("pass `tokenizer` with a loaded model")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"the tokenizer of {aligned_name} has no chat template; distillation trains on chat-formatted data")

    run_dir_owned = False
    run_dir = extra_args.pop("output_dir", None)
    if run_dir is None:
        run_dir = tempfile.mkdtemp(prefix="hf-safety-distill-")
        run_dir_owned = True
    args = DistillConfig(
        output_dir=str(run_dir),
        distill_variant=variant,
        distill_layers=list(layers) if layers is not None else None,
        distill_skip_layers=skip_layers,
        distill_mlp_names=list(mlp_names),
        distill_attn_names=list(attn_names),
        distill_vector_rounding=rounding,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        warmup_steps=warmup,
        lr_scheduler_type=lr_scheduler_type,
        max_length=max_length,
        bf16=bf16,
        seed=seed,
        logging_steps=logging_steps,
        disable_tqdm=not progress,
        **extra_args,
    )
    try:
        trainer = DistillTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer)
        trainer.aligned_name = aligned_name
        # a killed run resumes from its last checkpoint (`resume_from_checkpoint`: a checkpoint
        # folder, or True for the newest under `output_dir`) to the same vector, bit for bit on CPU
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        vector = trainer.safety_vector(dataset=data_name)
        summary = {"aligned_model": aligned_name, **vector.config.extra}
        harmful_dir = None
        if save_harmful_model is not None:
            from ..io.output import AtomicDir

            harmful_dir = Path(save_harmful_model)
            hm: Any = trainer.harmful_model()
            with AtomicDir(harmful_dir, overwrite=True) as atomic:  # written whole, then moved into place
                hm.save_pretrained(atomic.path)
                tokenizer.save_pretrained(atomic.path)
                atomic.commit()
        summary["total_time_s"] = round(time.perf_counter() - t_start, 2)
        vector.config.extra["total_time_s"] = summary["total_time_s"]
        if out is not None:
            vector.save_pretrained(out, dtype=dtype, overwrite=overwrite)
            from ..vectors import SafetyVector

            vector = SafetyVector.from_pretrained(out)
        pushed = None
        if push_to_hub:
            from ..io.hub import push_folder

            assert out is not None
            push_folder(out, push_to_hub, private=private,
                        commit_message=f"Upload safety vector distilled with hf-safety-merge ({variant})")
            pushed = push_to_hub
        return DistillResult(vector=vector, output_dir=out, summary=summary, harmful_model_dir=harmful_dir, pushed_to=pushed)
    finally:
        if run_dir_owned:
            shutil.rmtree(run_dir, ignore_errors=True)
