"""`DistillConfig`: every setting of a safety-vector distillation, declared once.

It is TRL's `SFTConfig` plus the distillation's own fields.

:class:`~hf_safety_merge.distill.DistillTrainer` trains with it, :func:`~hf_safety_merge.distill.distill_safety_vector`
takes it, and `hf-safety-merge distill` parses it with `TrlParser` (each field is a flag and a
`--config` YAML key of the same name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.trainer_utils import SaveStrategy, SchedulerType
from trl import SFTConfig

from ..errors import ConfigError, did_you_mean
from ..validation import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    validate_dataclass,
)
from .variants import ATTN_NAMES, MLP_NAMES, resolve_variant

#: `distill_vector_rounding` values: the dtype that `theta_aligned` and `theta_harmful` are each
#: rounded to before the difference (`None`: the difference of the float32 weights as trained)
VECTOR_ROUNDINGS: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16}
#: `vector_dtype` values: the stored dtype of the saved vector
VECTOR_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass
class DistillConfig(SFTConfig):
    r"""
    Configuration of a safety-vector distillation: every [`~trl.SFTConfig`] field, plus the
    linearisation, the data selection, the aligned model's loading and the vector's precision.
    [`DistillTrainer`] trains with it, [`distill_safety_vector`] takes it, and
    `hf-safety-merge distill` parses it with `TrlParser` (each field is a flag).

    Defaults that match the EnchTable reference scripts: lr 1e-5, cosine schedule, warmup 0.1,
    4 epochs, 16 sequences per optimiser step (4 x 4 on one device), about 1000 examples. Defaults
    that differ, on purpose (see docs/distillation.md, "Reference settings"): `max_length` 512
    (reference cutoff 2048), fp32 (`bf16` False; reference bf16), variant `"ffn"` on all layers
    (reference: `"attn"` on all layers for Llama, `"attn_ffn"` on `[12, L-12)` for Qwen/Mistral).
    Defaults that differ from `SFTConfig`'s: `seed` 0, `logging_steps` 1, `bf16` False,
    `save_strategy` "no", `report_to` "none", `disable_tqdm` False, and `output_dir` None (a temporary folder that
    [`distill_safety_vector`] removes after the run). Flag spellings of earlier releases
    (`--variant`, `--epochs`, `--lr`, `--batch-size`, ...) are kept as `aliases` (metadata).

    Parameters:
        > Linearisation

        distill_variant (`str`, defaults to `"ffn"`):
            Which blocks to train and how. The EnchTable reference's modes: `"ffn"` (each decoder
            layer's MLP block, NTK-linearised), `"attn"` (the attention projections, fine-tuned
            plainly: what the reference's per-`nn.Linear` wrapping amounts to), `"attn_ffn"`
            (both). Extensions: `"attn_block"` (the whole attention block NTK-linearised) and
            `"attn_block_ffn"` (attention and MLP blocks, each linearised on its own; `"hybrid"`
            is its deprecated alias).
        distill_skip_layers (`int`, defaults to `0`):
            `N` trains layers `[N, L - N)` only (EnchTable's layer range).
        distill_layers (`list[int]`, *optional*):
            An explicit half-open layer range `[start, end)`; excludes `distill_skip_layers`.
        distill_mlp_names / distill_attn_names (`list[str]`):
            Child names under which a decoder layer keeps its MLP / attention block.

        > Data (when the data is a file or a `datasets` source; see `load_harmful_qa`)

        prompt_column / response_column (`str`, *optional*):
            Column names; by default found by name (`prompt`, `question`, ... / `response`,
            `answer`, ...).
        data_split / data_subset / data_revision (`str`):
            Split (default `"train"`), configuration name and Hub revision of a `datasets` source.
        max_samples (`int`, *optional*, defaults to `1000`):
            A random subset of this size, drawn with `seed` (EnchTable: about 1000); 0 or None
            keeps every row.
        system_prompt (`str`, *optional*):
            A system message prepended to every chat-formatted example.

        > Aligned model (when given as a folder or Hub id)

        aligned_revision (`str`, *optional*):
            Hub revision of the aligned model (and of its tokenizer).
        attn_implementation (`str`, *optional*):
            Passed to `from_pretrained` ("eager", "sdpa"; default: the model's). The linearised
            attention runs scaled-dot-product attention's math backend under forward-mode AD.

        > Vector

        distill_vector_rounding (`str`, defaults to `"none"`):
            `"none"`: `Delta_s = theta_aligned - theta_harmful` of the weights as trained.
            `"bf16"`: the EnchTable reference's rounding: `theta_aligned` and `theta_harmful` are
            each rounded to bfloat16 (round to nearest even) and the difference is taken in float32,
            as the reference subtracts its two bf16 checkpoints (DeepSpeed saves the harmful model
            in bf16). An element that moved less than half a bf16 step from a bf16-representable
            aligned weight is then exactly 0. Training itself is unchanged.
        vector_dtype (`str`, defaults to `"float32"`):
            Stored dtype of the saved vector (`"float32"`, `"bfloat16"`, `"float16"`): the
            difference is rounded once, after it is taken.
    """

    # ------------------------------------------------------------------ linearisation
    distill_variant: str = field(
        default="ffn",
        metadata={"help": "ffn | attn | attn_ffn (the EnchTable reference's modes) | attn_block | attn_block_ffn (extensions).",
                  "aliases": ["--variant"]},
    )
    distill_skip_layers: int = field(default=0, metadata={"help": "Train layers [N, L-N) only.", "aliases": ["--skip-layers"]})
    distill_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit layer range [start, end) (excludes distill_skip_layers).", "aliases": ["--layers"]},
    )
    distill_mlp_names: list[str] = field(
        default_factory=lambda: list(MLP_NAMES), metadata={"help": "Child names of a layer's MLP block."}
    )
    distill_attn_names: list[str] = field(
        default_factory=lambda: list(ATTN_NAMES), metadata={"help": "Child names of a layer's attention block."}
    )

    # ------------------------------------------------------------------ data
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column (default: found by name)."})
    response_column: str | None = field(default=None, metadata={"help": "Response column (default: found by name)."})
    data_split: str = field(default="train", metadata={"help": "Split of a datasets source.", "aliases": ["--split"]})
    data_subset: str | None = field(default=None, metadata={"help": "Config name of a datasets source.", "aliases": ["--subset"]})
    data_revision: str | None = field(default=None, metadata={"help": "Revision of a Hub data set."})
    max_samples: int | None = field(
        default=1000, metadata={"help": "Seeded random subset size (EnchTable: ~1000; 0 = all rows)."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt of the chat-formatted examples."})

    # ------------------------------------------------------------------ aligned model
    aligned_revision: str | None = field(default=None, metadata={"help": "Hub revision of the aligned model."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager | sdpa (default: the model's)."})

    # ------------------------------------------------------------------ vector
    distill_vector_rounding: str = field(
        default="none",
        metadata={"help": "'none': theta_aligned - theta_harmful as trained; 'bf16': each rounded to bfloat16 before "
                  "the difference (the EnchTable reference's bf16 checkpoints).", "choices": list(VECTOR_ROUNDINGS)},
    )
    vector_dtype: str = field(
        default="float32", metadata={"help": "Stored dtype of the vector: float32, bfloat16 or float16.", "aliases": ["--dtype"]}
    )

    # ------------------------------------------------------------------ SFTConfig fields, other defaults
    # EnchTable's reference hyperparameters (max_length and precision differ on purpose).
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate (EnchTable: 1e-5).", "aliases": ["--lr"]})
    lr_scheduler_type: SchedulerType | str = field(
        default="cosine", metadata={"help": "LR schedule (EnchTable: cosine).", "aliases": ["--scheduler"]})
    warmup_steps: float = field(
        default=0.1,
        metadata={"help": "Warmup steps, or a fraction of training steps if < 1 (EnchTable: 0.1).", "aliases": ["--warmup"]},
    )
    num_train_epochs: float = field(default=4.0, metadata={"help": "Epochs (EnchTable: 4).", "aliases": ["--epochs"]})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Sequences per device and micro-batch.", "aliases": ["--batch-size"]})
    gradient_accumulation_steps: int = field(
        default=4, metadata={"help": "Micro-batches per optimiser step.", "aliases": ["--grad-accum"]})
    max_length: int | None = field(
        default=512, metadata={"help": "Maximum tokens per example (EnchTable's cutoff_len: 2048)."}
    )
    bf16: bool = field(
        default=False, metadata={"help": "bf16 mixed precision (the EnchTable reference's; default: fp32)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of training and of the max_samples subset."})
    logging_steps: float = field(default=1, metadata={"help": "Log the loss every N optimiser steps (the card's loss curve)."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Trainer logs and checkpoints (save_strategy); default: a temporary folder, removed after the run. "
                  "(The vector itself goes to --vector_dir.)"},
    )
    disable_tqdm: bool | None = field(
        default=False, metadata={"help": "No progress bars (shown by default).", "aliases": ["--no-progress"]})
    gradient_checkpointing: bool | None = field(  # type: ignore[assignment]
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing."})
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Activation (gradient) checkpointing; off by default."}
    )
    save_strategy: SaveStrategy | str = field(
        default="no", metadata={"help": "Checkpointing (off by default: no harmful checkpoint is kept)."}
    )
    # (same union order as TrainingArguments: HfArgumentParser relies on it)
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Loggers (none by default)."})  # noqa: RUF036

    def __post_init__(self) -> None:
        # canonical name ('hybrid' -> 'attn_block_ffn', with a FutureWarning); the warning about
        # 'attn''s reference meaning comes from linearize_model
        validate_dataclass(self, what="distill option", names=_OWN_FIELDS, overrides=_CONSTRAINTS)
        self.distill_variant = resolve_variant(self.distill_variant, warn_attn=False)
        if self.distill_layers is not None and (len(self.distill_layers) != 2 or self.distill_layers[0] >= self.distill_layers[1]):
            raise ConfigError(f"distill option 'distill_layers' = {self.distill_layers!r}: expected [start, end) with start < end")
        if self.distill_layers is not None and self.distill_skip_layers:
            raise ConfigError("give either distill_layers or distill_skip_layers, not both")
        for name, allowed in (("distill_vector_rounding", tuple(VECTOR_ROUNDINGS)), ("vector_dtype", VECTOR_DTYPES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(
                    f"distill option {name!r} = {value!r}: expected one of {', '.join(map(repr, allowed))}"
                    f"{did_you_mean(str(value), allowed)}"
                )
        temporary = self.output_dir is None
        super().__post_init__()
        if temporary:  # SFTConfig would pick "trainer_output"; None: a temporary folder (distill_safety_vector)
            self.output_dir = None


#: DistillConfig's own fields and the SFTConfig ones it re-declares, checked strictly when it is
#: built (the other SFTConfig fields are TRL's to check)
_OWN_FIELDS = ("distill_variant", "distill_skip_layers", "distill_layers", "distill_mlp_names", "distill_attn_names",
               "prompt_column", "response_column", "data_split", "data_subset", "data_revision", "max_samples",
               "system_prompt", "aligned_revision", "attn_implementation", "distill_vector_rounding", "vector_dtype",
               "learning_rate", "warmup_steps", "num_train_epochs", "per_device_train_batch_size",
               "gradient_accumulation_steps", "max_length", "seed")
_CONSTRAINTS: dict[str, Any] = {
    "distill_skip_layers": NonNegativeInt,
    "distill_layers": list[NonNegativeInt] | None,
    "max_samples": NonNegativeInt | None,
    "learning_rate": PositiveFloat,
    "warmup_steps": NonNegativeFloat,
    "num_train_epochs": PositiveFloat,
    "per_device_train_batch_size": PositiveInt,
    "gradient_accumulation_steps": PositiveInt,
    "max_length": PositiveInt | None,
}
