"""A safety vector's card: provenance, norms, tensor filter, and how to apply it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from .model_card import PROJECT_URL, _hub_id, _rev

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from ..vectors import SafetyVectorConfig


def safety_vector_card(cfg: SafetyVectorConfig) -> ModelCard:
    from huggingface_hub import ModelCard, ModelCardData

    base = _hub_id(cfg.aligned_model)
    data = ModelCardData(
        library_name="hf-safety-merge",
        base_model=base,
        tags=["safety", "hf-safety-merge", "safety-vector"],
    )
    filt = yaml.safe_dump(cfg.tensor_filter, sort_keys=False) if cfg.tensor_filter else "{}\n"
    extra = yaml.safe_dump(cfg.extra, sort_keys=False) if cfg.extra else ""
    content = f"""---
{data.to_yaml()}
---

# Safety vector for {cfg.architecture}

`Delta_s = theta_aligned - theta_reference`, to be merged into fine-tuned models of the same
architecture with [hf-safety-merge]({PROJECT_URL}) (EnchTable, task arithmetic, Safe LoRA, TIES, DARE).

- aligned model: `{cfg.aligned_model}`{_rev(cfg.aligned_revision)}
- reference model: `{cfg.reference_model}`{_rev(cfg.reference_revision)}
- method: `{cfg.method}`
- tensors: {cfg.num_tensors}, parameters: {cfg.num_parameters:,}, global L2 norm: {cfg.norm:.6g}
- stored dtype: {cfg.dtype}
- created: {cfg.created_at} with hf-safety-merge {cfg.library_version}

Tensor filter:

```yaml
{filt}```
{("Details:" + chr(10) + chr(10) + "```yaml" + chr(10) + extra + "```" + chr(10)) if extra else ""}
## Usage

```python
from hf_safety_merge import AutoSafeModelForCausalLM
# the vector's aligned model is the task reference by default
model = AutoSafeModelForCausalLM.from_pretrained("your/fine-tuned-model", safety_vector="this/vector-repo")
```
"""
    return ModelCard(content)
