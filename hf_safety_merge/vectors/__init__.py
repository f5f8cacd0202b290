"""Safety vectors: `Delta_s = theta_aligned - theta_reference` over a chosen set of tensors.

Owns the vector (`vector`: compute, save, load, push), its config (`config`), its folder's file
names (`files`) and the EnchTable subspace cache stored with it (`subspace_cache`). Layer 3
(docs/architecture.md): may import `io`, `errors` and `methods`; its card is written through `io.sink`.

A safety vector folder holds `safety_vector.safetensors` (or shards plus an index),
`safety_vector_config.json` (architecture, sources and revisions, tensor filter, norms, library
version) and a `README.md` card. Vectors are computed by streaming both checkpoints one tensor at
a time and written shard by shard into a temporary folder that is renamed at the end.
"""

from .config import SafetyVectorConfig
from .files import SUBSPACE_CACHE, VECTOR_CONFIG, VECTOR_PREFIX
from .subspace_cache import CACHE_GAMMA, SubspaceCache, tensor_hash, write_subspace_cache
from .vector import SafetyVector

__all__ = [
    "CACHE_GAMMA",
    "SUBSPACE_CACHE",
    "VECTOR_CONFIG",
    "VECTOR_PREFIX",
    "SafetyVector",
    "SafetyVectorConfig",
    "SubspaceCache",
    "tensor_hash",
    "write_subspace_cache",
]
