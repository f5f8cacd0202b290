"""`distill_safety_vector`: one call from a `DistillConfig`, an aligned model and harmful QA data to a safety vector."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import DistillConfig

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
        raise ConfigError(f"output folder {out} exists and is not empty; pass overwrite=True (CLI: --overwrite true) to replace it")


def distill_safety_vector(
    config: DistillConfig,
    aligned: Any,
    data: Any,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    save_harmful_model: str | os.PathLike[str] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    overwrite: bool = False,
    callbacks: list[Any] | None = None,
) -> DistillResult:
    """Distil an EnchTable safety vector from an aligned model and harmful QA data.

    The chosen blocks of `aligned` are NTK-linearised around the aligned weights and fine-tuned on
    the harmful (prompt, response) pairs with a :class:`~hf_safety_merge.distill.DistillTrainer`
    (TRL's `SFTTrainer`, loss on response tokens only); the result is
    `Delta_s = theta_aligned - theta_harmful` on the trained tensors, saved as a
    :class:`~hf_safety_merge.SafetyVector` folder whose card records the data, variant, steps,
    loss curve and time. The harmful model itself is discarded unless `save_harmful_model` is set.

    Every setting (variant, layers, data columns and subset, hyperparameters, rounding, stored
    dtype, ...) is a field of `config`; the other arguments say where things come from and go::

        config = DistillConfig(distill_variant="attn_ffn", distill_skip_layers=2, max_steps=50)
        result = distill_safety_vector(config, "org/aligned-model", "harmful.jsonl", "./safety-vector")

    Args:
        config: the :class:`~hf_safety_merge.distill.DistillConfig`. Its `output_dir` is the
            trainer's folder (logs, checkpoints with `save_strategy`, `resume_from_checkpoint`);
            None (the default) uses a temporary folder, removed afterwards.
        aligned: the aligned model: a local folder, a Hub id (loaded in float32 with
            `config.aligned_revision` / `config.attn_implementation`), or a loaded
            `PreTrainedModel` (then pass `tokenizer`).
        data: harmful QA: a CSV/JSONL/JSON/Parquet file, a `datasets` folder or Hub id (read with
            `config`'s data fields, see :func:`~hf_safety_merge.distill.load_harmful_qa`), or a
            `datasets.Dataset` already in prompt-completion form (used as it is).
        output_dir: where the vector folder is written (atomically, in `config.vector_dtype`);
            None keeps it in memory.
        tokenizer: the tokenizer (default: the aligned model's); it needs a chat template.
        save_harmful_model: also write the trained (harmful) model there (not kept by default).
        push_to_hub: a Hub repo id to push the vector folder to (one commit); needs `output_dir`.
        private: create that repo as private.
        overwrite: replace a non-empty `output_dir` / `save_harmful_model` folder.
        callbacks: `TrainerCallback`s for the trainer (e.g. a `SafetyMonitorCallback`).
    """
    from .config import DistillConfig
    from .data import load_harmful_qa
    from .trainer import DistillTrainer

    t_start = time.perf_counter()
    if not isinstance(config, DistillConfig):
        raise ConfigError(f"distill_safety_vector needs a DistillConfig first, got {type(config).__name__}")
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
            prompt_column=config.prompt_column,
            response_column=config.response_column,
            split=config.data_split,
            subset=config.data_subset,
            revision=config.data_revision,
            max_samples=config.max_samples or None,
            system_prompt=config.system_prompt,
            seed=config.seed,
        )
        data_name = str(data)
    if isinstance(aligned, (str, os.PathLike)):
        model: Any = str(aligned)  # loaded by DistillTrainer (float32, config's revision / attention)
        aligned_name: str | None = str(aligned)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(aligned), revision=config.aligned_revision)
    else:
        model = aligned
        aligned_name = getattr(model.config, "_name_or_path", None) or None
        if tokenizer is None:
            raise ConfigError("pass `tokenizer` with a loaded model")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"the tokenizer of {aligned_name} has no chat template; distillation trains on chat-formatted data")

    args = config
    run_dir_owned = config.output_dir is None
    if run_dir_owned:
        args = copy.copy(config)  # the caller's config is left as it is
        args.output_dir = tempfile.mkdtemp(prefix="hf-safety-distill-")
    try:
        trainer = DistillTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                                 callbacks=callbacks)
        trainer.aligned_name = aligned_name
        # a killed run resumes from its last checkpoint (`resume_from_checkpoint`: a checkpoint
        # folder, or True for the newest under `output_dir`) to the same vector, bit for bit on CPU
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        vector = trainer.safety_vector(dataset=data_name)
        summary = {"aligned_model": aligned_name, **vector.config.extra}
        harmful_dir = None
        # under DDP every rank holds the same vector: the main process writes and pushes, the
        # others wait for it and then read the same folder
        main = trainer.is_world_process_zero()
        if save_harmful_model is not None and main:
            from ..io.output import AtomicDir

            hm: Any = trainer.harmful_model()
            with AtomicDir(Path(save_harmful_model), overwrite=True) as atomic:  # written whole, then moved into place
                hm.save_pretrained(atomic.path)
                tokenizer.save_pretrained(atomic.path)
                atomic.commit()
        summary["total_time_s"] = round(time.perf_counter() - t_start, 2)
        vector.config.extra["total_time_s"] = summary["total_time_s"]
        if save_harmful_model is not None:
            harmful_dir = Path(save_harmful_model)
        if out is not None:
            if main:
                vector.save_pretrained(out, dtype=config.vector_dtype, overwrite=overwrite)
            trainer.accelerator.wait_for_everyone()
            from ..vectors import SafetyVector

            vector = SafetyVector.from_pretrained(out)
        pushed = None
        if push_to_hub and main:
            from ..io.hub import push_folder

            assert out is not None
            push_folder(out, push_to_hub, private=private,
                        commit_message=f"Upload safety vector distilled with hf-safety-merge ({config.distill_variant})")
            pushed = push_to_hub
        return DistillResult(vector=vector, output_dir=out, summary=summary, harmful_model_dir=harmful_dir, pushed_to=pushed)
    finally:
        if run_dir_owned:
            shutil.rmtree(str(args.output_dir), ignore_errors=True)
