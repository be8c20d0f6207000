"""Deployment tools: Control Adapter -> PEFT LoRA (`craft convert`), shard-by-shard merging (`craft merge`),
llama.cpp LoRA GGUF (`craft export-gguf`) and adapter norms (`craft inspect`). See docs/export.md.

Library entry points: `convert.measure_logits_error`, `merge.merge`, `gguf_export.export_gguf`,
`inspect.inspect_adapter`; the shared pieces are `control` (the conversion math), `lora` (low-rank updates and
PEFT files), `checkpoint` (tensor-at-a-time reading and streaming safetensors writing) and `output` (safe outputs).
"""
