"""Distil an EnchTable safety vector with TRL: NTK-linearised harmful fine-tuning of an aligned model.

    # one process (the same as `hf-safety-merge distill --config ...`)
    python examples/distill_safety_vector.py --config examples/distill_config.yaml
    # several GPUs (DDP), everything else unchanged
    accelerate launch examples/distill_safety_vector.py --config examples/distill_config.yaml

Every `DistillConfig` field (all of `SFTConfig`, plus `--distill_variant`, `--distill_skip_layers`,
`--distill_layers`) is a flag; the script arguments (`DistillScriptArguments`) choose the model,
the data and where the vector goes. The harmful model is not saved unless
`--save_harmful_model DIR` is given.
"""

# The script lives in the package (`hf-safety-merge distill` runs the same code): this file is a
# thin wrapper kept for `python examples/...` and `accelerate launch examples/...`.
from hf_safety_merge.scripts.distill import DistillScriptArguments as ScriptArguments  # noqa: F401
from hf_safety_merge.scripts.distill import main, make_parser, run  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(run())
