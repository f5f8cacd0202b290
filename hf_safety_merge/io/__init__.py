"""The only place that touches bytes: safetensors streaming, checkpoint views, output folders, the Hub.

Owns: header-first safetensors reads and shard-by-shard writes (`safetensors_stream`), tensor
sources over local folders, pickles and LoRA adapters (`checkpoints`), Hub resolve / header-first
remote reads / atomic pushes and `open_checkpoint` (`hub`), atomic output folders (`output`),
tensor-name filters (`filters`) and the card sink interface that higher layers implement
(`sink`). Layer 1 (docs/architecture.md): may import only `errors` and `validation`.
"""
