"""craft-tune: contrastive (CRAFT) and steering (Control Adapter) fine-tuning of causal language models."""

__version__ = "0.1.0"
