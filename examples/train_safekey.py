# Copyright the hf-safety-merge authors. Apache-2.0.
"""SafeKey: dual-path safety head + query-mask modelling on a reasoning model, as a TRL-style script.

Every `SFTConfig` / `ModelConfig` flag of TRL's `sft.py` works, plus the `--safekey_*` flags of
`SafeKeyConfig` (see `docs/safekey.md`). The data set holds (prompt, reasoning response, label)
records: a `prompt` (string or chat messages), a `response` whose reasoning (inside `<think>...</think>`
if it has the tags) opens with a restatement of the query, and a `label` (1 / "harmful",
0 / "benign"); optional `u_end` / `k_end` character offsets into the response mark U and K
explicitly, otherwise a heuristic finds them.

```bash
# one process
python examples/train_safekey.py --config examples/safekey_config.yaml

# the same, flags only
python examples/train_safekey.py \
    --model_name_or_path deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B \
    --dataset_name data/safekey.jsonl \
    --safekey_head_weight 0.2 --safekey_qmm_weight 0.2 --safekey_last_k_epochs 2 \
    --num_train_epochs 5 --learning_rate 1e-5 --output_dir out-safekey

# several processes
accelerate launch --num_processes 2 examples/train_safekey.py --config examples/safekey_config.yaml
```

The last line the main process prints is a JSON summary (final losses, the SafeKey metrics per
logging step) that scripts and tests can read.
"""

# The script lives in the package (`hf-safety-merge safekey` runs the same code): this file is a
# thin wrapper kept for `python examples/train_safekey.py` and `accelerate launch examples/train_safekey.py`.
from hf_safety_merge.scripts.safekey import (  # noqa: F401
    SafeKeyScriptArguments,
    load_data,
    main,
    make_parser,
    run,
)

if __name__ == "__main__":
    raise SystemExit(run())
