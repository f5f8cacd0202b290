"""The demos: `quick` (the toy-model walk-through of `hf-safety-merge demo --quick`) and `toy_models` (the
tiny chat models it and the Space use). The full demo is the study's `demo` preset (`hf_safety_merge.study`).

Layer 6 (docs/architecture.md).
"""
