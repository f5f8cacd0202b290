"""The file names of a safety vector folder (weights prefix, config, subspace cache)."""

VECTOR_PREFIX = "safety_vector"
VECTOR_CONFIG = "safety_vector_config.json"
SUBSPACE_CACHE = "subspace_cache.safetensors"
