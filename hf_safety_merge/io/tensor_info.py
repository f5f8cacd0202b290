"""Where a tensor lives in a safetensors file: the dtype tags of the format (`DTYPE_TAGS`,
`TORCH_TO_TAG`, `dtype_size`) and `TensorInfo`, read from a header alone; shared by the header
reader (`safetensors_stream`) and the tensor reader (`tensor_reader`).

Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype tags <-> torch dtypes.
DTYPE_TAGS: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_TAG: dict[torch.dtype, str] = {v: k for k, v in DTYPE_TAGS.items()}


def dtype_size(tag: str) -> int:
    return torch.empty((), dtype=DTYPE_TAGS[tag]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, as read from the header alone."""

    name: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_TAGS[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start
