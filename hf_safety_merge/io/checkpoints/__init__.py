"""Streaming views of checkpoints.

A *tensor source* exposes the names, shapes and dtypes of its tensors from file headers alone,
and reads one tensor at a time on demand. Sources:

- `SafetensorsCheckpoint`: a local folder with `model.safetensors`, or sharded files plus
  `model.safetensors.index.json`, or a single `.safetensors` file (Hub repos are resolved to a
  local snapshot by `hf_safety_merge.io.hub`).
- `PickleCheckpoint`: legacy `pytorch_model*.bin` files, only with an explicit `allow_pickle=True`
  (unpickling can run arbitrary code; loaded with `torch.load(weights_only=True)` regardless).
- `LoraCheckpoint`: a base checkpoint plus a PEFT LoRA adapter, seen as full weights
  `W + scaling * B @ A` computed per tensor on the fly, never materialising the merged model.
- `InMemorySource`: a dict of tensors (tests, small vectors).

Modules: `source` (`TensorMeta`, `TensorSource`, `InMemorySource`), `local`
(`SafetensorsCheckpoint`, `PickleCheckpoint`), `lora` (`LoraCheckpoint`). Layer 1
(docs/architecture.md): may import only `errors` and `validation`.
"""

from .local import PickleCheckpoint, SafetensorsCheckpoint, find_safetensors_files
from .lora import LoraCheckpoint, LoraModule
from .source import InMemorySource, TensorMeta, TensorSource

__all__ = [
    "InMemorySource",
    "LoraCheckpoint",
    "LoraModule",
    "PickleCheckpoint",
    "SafetensorsCheckpoint",
    "TensorMeta",
    "TensorSource",
    "find_safetensors_files",
]
