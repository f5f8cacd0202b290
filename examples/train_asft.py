# Copyright the hf-safety-merge authors. Apache-2.0.
"""AsFT: safety-anchored LoRA fine-tuning, as a TRL-style script.

Every `SFTConfig` / `ModelConfig` flag of TRL's `sft.py` works, plus the `--asft_*` flags of
`AsFTConfig` (see `docs/asft.md`). AsFT trains LoRA adapters, so `--use_peft` is implied.

```bash
# one process
python examples/train_asft.py --config examples/asft_config.yaml

# the same, flags only: fine-tune the *aligned* model, anchored to W_aligned - W_base
python examples/train_asft.py \
    --model_name_or_path path/or/hub-id-of-aligned-model \
    --asft_base_model path/or/hub-id-of-its-unaligned-base \
    --asft_anchors_path anchors.safetensors \
    --asft_lambda 1.0 \
    --dataset_name trl-lib/Capybara \
    --lora_r 8 --lora_alpha 32 --lora_target_modules q_proj v_proj \
    --learning_rate 5e-5 --num_train_epochs 10 --per_device_train_batch_size 8 \
    --output_dir out-asft

# several processes (DDP; on CPU the gloo backend is used)
accelerate launch --num_processes 2 examples/train_asft.py --config examples/asft_config.yaml
```

The last line the main process prints is a JSON summary (final task loss, penalty, the per-module
off-basin drift of the trained adapters) that scripts and tests can read.
"""

# The script lives in the package (`hf-safety-merge asft` runs the same code): this file is a
# thin wrapper kept for `python examples/train_asft.py` and `accelerate launch examples/train_asft.py`.
from hf_safety_merge.scripts.asft import AsFTScriptArguments, load_data, main, make_parser, run  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(run())
