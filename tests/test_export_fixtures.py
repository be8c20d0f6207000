"""Shared builders for the export tests (no tests here): base models on disk, random Control Adapters and LoRAs."""

from __future__ import annotations

import torch

from craft.testing import save_tiny_model

VOCAB = 384


def load_base(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()


def probe_ids(seed: int = 5, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(4, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def randomize_control_adapters(model, seed: int = 0, size: float = 0.35) -> None:
    """Random non-zero factors with ||W||_2 well below 1 (so the Neumann option is meaningful)."""
    from craft.adapters import control_adapters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in control_adapters(model):
            if adapter.type == "lowrank":
                hidden, rank = adapter.B.shape
                adapter.A.copy_(torch.randn(rank, hidden, generator=generator) / hidden ** 0.5)
                adapter.B.copy_(size * torch.randn(hidden, rank, generator=generator) / adapter.scale / rank ** 0.5)
            else:
                q, _ = torch.linalg.qr(torch.randn(*adapter.Q.shape, generator=generator))
                adapter.Q.copy_(q + 0.02 * torch.randn(*q.shape, generator=generator))  # slightly non-orthonormal
                adapter.S.copy_(size * torch.randn(adapter.S.shape, generator=generator))


def make_control_adapter(tmp_path, family: str, seed: int = 0, max_shard_size=None, **config):
    """(base_dir, adapter_dir, model): a tiny base on disk and a random Control Adapter saved for it; `model` is the
    base with the adapter attached (the reference)."""
    from craft.adapters import ControlAdapterConfig, add_control_adapters, save_control_adapter

    base_dir = save_tiny_model(tmp_path / f"{family}-base", family, max_shard_size=max_shard_size)
    model = load_base(base_dir)
    add_control_adapters(model, ControlAdapterConfig(**{"rank": 4, "alpha": 2.0, **config}))
    randomize_control_adapters(model, seed)
    adapter_dir = save_control_adapter(model, tmp_path / f"{family}-control")
    return base_dir, adapter_dir, model


def adapter_logits(model, direction: int = 1, strength: float = 1.0, ids=None) -> torch.Tensor:
    from craft.adapters import control_class

    with torch.no_grad(), control_class(model, value=direction, strength=strength):
        return model(input_ids=probe_ids() if ids is None else ids).logits


def peft_logits(base_dir, lora_dir, ids=None) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(load_base(base_dir), str(lora_dir)).eval()(
            input_ids=probe_ids() if ids is None else ids).logits


def plain_logits(model_dir, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return load_base(model_dir)(input_ids=probe_ids() if ids is None else ids).logits


def make_lora(base_dir, out_dir, target_modules, seed: int = 0, **config):
    """A PEFT LoRA with random non-zero A and B saved to `out_dir`; returns the PeftModel (the reference)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(load_base(base_dir), LoraConfig(
        r=config.pop("r", 4), lora_alpha=config.pop("lora_alpha", 8), target_modules=target_modules,
        init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()
