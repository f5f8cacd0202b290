"""Writes notebooks/safekey.ipynb (outputs stripped): python notebooks/tools/make_safekey_nb.py"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = []


def md(text: str) -> None:
    cells.append(new_markdown_cell(text.strip()))


def code(text: str) -> None:
    cells.append(new_code_cell(text.strip()))


md(r"""
# SafeKey: a dual-path safety head and query-mask modelling for reasoning models

A reasoning model's thought usually opens with a restatement of the query (the *understanding* **U**)
followed by a *key sentence* **K** that decides whether it goes on safely. **SafeKey**
(arXiv 2505.16186) adds two objectives to supervised fine-tuning:

- a **dual-path safety head**: two `Linear(hidden, 1)` heads on the mean-pooled final hidden states
  over U and over X+U predict whether the query is harmful;
- **query-mask modelling (QMM)**: a second forward pass in which no token may attend to the query X,
  with cross-entropy on the K tokens only, so the model learns to produce K from its own understanding.

`SafeKeyTrainer` is TRL's `SFTTrainer` plus both, configured by `SafeKeyConfig` (every `SFTConfig`
field plus `safekey_*` fields). Here we train the Space's toy `aligned` model on a few reasoning-format
examples. Offline, well under a minute on a CPU.
""")
code(r"""
import sys
from pathlib import Path

import datasets
import pandas as pd
import transformers
from transformers import AutoTokenizer

import hf_safety_merge

transformers.utils.logging.disable_progress_bar()  # quieter cell outputs
datasets.disable_progress_bars()
pd.set_option("display.max_colwidth", 80)

# The Space's toy models (hf_safety_merge.demo.toy_models), built once into ./toy_models (a few seconds on a CPU).
from hf_safety_merge.demo import toy_models

toy = toy_models.build_toy_family("toy_models")
tokenizer = AutoTokenizer.from_pretrained(toy["aligned"])

# (prompt, reasoning response, label) records: the reasoning opens with a restatement of the query (U),
# then the key sentence (K) that decides, then the answer.
harmful = [
    {"prompt": p,
     "response": f"<think>The user is asking: {p.rstrip('?.')}. This would hurt people, so I must refuse.</think>{toy_models.REFUSAL}",
     "label": "harmful"}
    for p in toy_models.HARMFUL_PROMPTS[:6]
]
benign = [
    {"prompt": p,
     "response": f"<think>The user wants to know: {p.rstrip('?.')}. This is a harmless request, so I can answer.</think>{a}",
     "label": "benign"}
    for p, a in (toy_models.BENIGN + toy_models.TASK)[:6]
]
records = harmful + benign
pd.DataFrame(records).head(3)
""")
md(r"""
## U and K in tokens

`prepare_safekey_dataset` renders each record with the tokenizer's chat template, tokenises the whole
text **once** with the offset mapping, and maps the character spans of U and K to token spans (found
by a documented heuristic here; explicit `u_end`/`k_end` character offsets also work). The query's
tokens get label -100, so the SFT loss covers the response only.
""")
code(r"""
from hf_safety_merge.training.safekey import prepare_safekey_dataset

train = prepare_safekey_dataset(records, tokenizer, max_length=128)
view = []
for row in train.select([0, 6]):
    ids = row["input_ids"]
    view.append({
        "label": row["safekey_label"],
        "query tokens": row["safekey_query_len"],
        "U": tokenizer.decode(ids[row["safekey_u_start"]:row["safekey_u_end"]]),
        "K": tokenizer.decode(ids[row["safekey_k_start"]:row["safekey_k_end"]]),
    })
pd.DataFrame(view)
""")
md(r"""
## Training

The paper switches the auxiliary losses on for the last 2 epochs (`safekey_last_k_epochs=2`); on this
short run they are on throughout (`None`). Weights 0.2 and 0.2 are the paper's.
""")
code(r"""
from hf_safety_merge.training import SafeKeyConfig, SafeKeyTrainer

args = SafeKeyConfig(
    output_dir="safekey-toy",
    safekey_head_weight=0.2, safekey_qmm_weight=0.2, safekey_last_k_epochs=None,
    max_steps=30, learning_rate=3e-3, lr_scheduler_type="constant", per_device_train_batch_size=6,
    max_length=128, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
    disable_tqdm=True, seed=0,
)
trainer = SafeKeyTrainer(model=str(toy["aligned"]), args=args, train_dataset=train, processing_class=tokenizer)
trainer.train()
# TRL's loss is L_SFT + 0.2 L_QMM + 0.2 L_head; each part is logged under safekey/*.
cols = ["step", "loss", "safekey/sft_loss", "safekey/qmm_loss", "safekey/head_loss", "safekey/head_accuracy"]
pd.DataFrame([{c: h.get(c) for c in cols} for h in trainer.state.log_history if "loss" in h]).round(4)
""")
md(r"""
## The heads stay out of the model

`save_model` writes the model only, loadable with `from_pretrained` as usual; the safety heads are
saved beside it only if asked (`save_safekey_heads`, or `safekey_save_heads=True`).
""")
code(r"""
from safetensors import safe_open

trainer.save_model("safekey-toy/model")
heads_file = trainer.save_safekey_heads("safekey-toy/model")
with safe_open(heads_file, "pt") as f:
    head_keys = set(f.keys())
    print(heads_file.name, {k: list(f.get_slice(k).get_shape()) for k in head_keys})
with safe_open("safekey-toy/model/model.safetensors", "pt") as f:
    model_keys = set(f.keys())
print("every tensor in model.safetensors is one of the model's own:", model_keys <= set(trainer.model.state_dict()))
print("head tensors in model.safetensors:", sorted(model_keys & head_keys))
sorted(p.name for p in Path("safekey-toy/model").iterdir())
""")
md(r"""
**Next steps**

- `examples/train_safekey.py --config examples/safekey_config.yaml`: the same as a TRL-style script
  with the paper's schedule (5 epochs, lr 1e-5, auxiliary losses in the last 2), runnable with
  `accelerate launch`.
- `safekey_qmm_mode="compact"` runs the QMM pass on the tokens after the query only: the same K logits,
  cheaper (see `docs/safekey.md` and `benchmarks/bench_safekey.py`).
- Data from a reasoning model's own outputs: `prepare_safekey_dataset(records, tokenizer, ...)` accepts
  chat-message prompts, explicit U/K character offsets, and the Llama-3, ChatML and DeepSeek-R1 templates.
""")

nb = new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
nb.metadata["language_info"] = {"name": "python"}
nbformat.validate(nb)
nbformat.write(nb, str(Path(__file__).resolve().parents[1] / "safekey.ipynb"))
