#!/usr/bin/env bash
# AsFT under accelerate's own FSDP2 on 2 GPUs, where accelerate applies fully_shard after the
# trainer is built (a path CPU launches cannot take: there the trainer shards the model itself).
# Run from the repository root on a machine with 2 CUDA GPUs and the [train] extra installed:
#   bash benchmarks/gpu_check_sharded_asft.sh
# Expected output: two JSON summaries, then "OK: FSDP2 on GPU matches one process", with
#   - summary["engine"] == "fsdp2", summary["sharding"]["lora_B"]["placements"] == ["S(0)"],
#     local_shape[0] * 2 == global_shape[0] for lora_B and lora_A,
#   - anchor_bytes.local * 2 == anchor_bytes.whole,
#   - the penalty per step and the loss within 1e-4 relative of the one-GPU run (TF32 off).
set -euo pipefail
WORK="${WORK:-$(mktemp -d)}"
export NVIDIA_TF32_OVERRIDE=0 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD"
python - "$WORK" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_asft_training import make_tiny_setup
make_tiny_setup(Path(sys.argv[1]) / "setup")
PY
common=(--model_name_or_path "$WORK/setup/aligned" --asft_base_model "$WORK/setup/base"
        --asft_anchors_path "$WORK/anchors.safetensors" --asft_lambda 5 --dataset_name "$WORK/setup/data/train.jsonl"
        --lora_r 4 --lora_alpha 8 --lora_dropout 0 --lora_target_modules q_proj v_proj up_proj down_proj
        --max_steps 4 --optim sgd --learning_rate 0.5 --lr_scheduler_type constant --logging_steps 1
        --save_strategy no --report_to none --max_length 32 --seed 0 --dtype float32 --bf16 false
        --train_sampling_strategy sequential --disable_tqdm true)
CUDA_VISIBLE_DEVICES=0 python examples/train_asft.py "${common[@]}" --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 2 --output_dir "$WORK/one" --summary_file "$WORK/one.json"
sed 's/num_processes: 8/num_processes: 2/; s/mixed_precision: bf16/mixed_precision: "no"/' examples/accelerate_fsdp2.yaml > "$WORK/fsdp2.yaml"
accelerate launch --config_file "$WORK/fsdp2.yaml" examples/train_asft.py "${common[@]}" --per_device_train_batch_size 4 \
    --output_dir "$WORK/two" --summary_file "$WORK/two.json"
python - "$WORK" <<'PY'
import json, math, sys
w = sys.argv[1]
a, b = json.load(open(f"{w}/one.json")), json.load(open(f"{w}/two.json"))
sh = b["sharding"]
assert b["engine"] == "fsdp2" and sh["lora_B"]["placements"] == ["S(0)"], sh
assert sh["lora_B"]["local_shape"][0] * 2 == sh["lora_B"]["global_shape"][0], sh
assert b["anchor_bytes"]["local"] * 2 == b["anchor_bytes"]["whole"], b["anchor_bytes"]
for x, y in zip(a["penalty"] + a["loss"], b["penalty"] + b["loss"], strict=True):
    assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-9), (x, y)
print("OK: FSDP2 on GPU matches one process")
PY
