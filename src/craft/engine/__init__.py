"""The TOML training system behind `craft train` (see docs/training.md).

Modules: `config` (schema and errors), `data` (reading, packing, cache, micro-batches), `model` (per-stage
loading, 4-bit, LoRA / Control Adapters / full fine-tune), `pipeline` (DeepSpeed pipeline items and loss),
`distributed` (process group, topology), `train` (the loop), `checkpoint`, `outputs`, `cli`.
"""
