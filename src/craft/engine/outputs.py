"""What a run leaves behind after each epoch, in `output_dir/<run>/epochN/` (written atomically):

* LoRA — PEFT's `save_pretrained` format (`adapter_config.json`, `adapter_model.safetensors`), loadable with
  `PeftModel.from_pretrained(base, path)`;
* Control Adapters — `craft.adapters.save_control_adapter` format;
  both with `base_model.json` (absolute base path, model_type, config.json sha256) for the export tools;
* full fine-tune — a Hugging Face model directory (config, tokenizer, one safetensors shard per pipeline stage
  plus `model.safetensors.index.json`), loadable with `AutoModelForCausalLM.from_pretrained(path)`.

Adapters are small: every stage sends its trained tensors to rank 0, which writes the whole adapter. Full
fine-tunes are not gathered: each stage writes its own shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from craft.engine.distributed import barrier, gather_to_zero
from craft.engine.model import StageModel
from craft.export.checkpoint import write_base_record


def owned_prefixes(stage: StageModel) -> list[str]:
    """Name fragments of the modules this stage owns, as they appear in `stage.model.named_parameters()`."""
    prefixes = [f"model.layers.{i}." for i in stage.owned_layer_indices()]
    if stage.owns_embedding():
        prefixes.append("model.embed_tokens.")
    if stage.owns_head():
        prefixes += ["model.norm.", "lm_head."]
    return prefixes


def owned_trained_tensors(stage: StageModel) -> dict[str, torch.Tensor]:
    """name -> tensor (CPU) of the trained parameters this stage owns."""
    prefixes = owned_prefixes(stage)
    return {name: p.detach().cpu() for name, p in stage.model.named_parameters()
            if p.requires_grad and not p.is_meta and any(f".{q}" in f".{name}" for q in prefixes)}


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_epoch_output(stage: StageModel, directory: Path, replica: int) -> None:
    """Collectively write the trained adapter / model of this run to `directory` (see the module docstring).

    Must be called by every rank. On rank 0 the gathered tensors replace its own copies of other stages'
    parameters, so call it only when training is over or is about to be checkpointed anyway (rank 0 keeps
    training with its own stage, which is unaffected).
    """
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if stage.mode == "full":
        _save_full_shard(stage, tmp, replica)
    else:
        gathered = gather_to_zero(owned_trained_tensors(stage) if replica == 0 else {})
        if rank == 0:
            _save_adapter(stage, tmp, gathered)
    barrier()
    if rank == 0:
        _publish(tmp, directory)
    barrier()


def _save_adapter(stage: StageModel, tmp: Path, gathered: list[dict]) -> None:
    from craft.adapters import save_control_adapter

    own = owned_trained_tensors(stage)
    scratch = stage.model
    for tensors in gathered:
        for name, tensor in tensors.items():
            if name not in own:
                _assign(scratch, name, tensor)
    if stage.mode == "control":
        save_control_adapter(stage.base, tmp)
    else:
        scratch.save_pretrained(str(tmp))
    write_base_record(tmp, Path(stage.hf_config._name_or_path), stage.hf_config.model_type)


def _save_full_shard(stage: StageModel, tmp: Path, replica: int) -> None:
    from safetensors.torch import save_file

    from craft.engine.distributed import all_gather

    tied = getattr(stage.hf_config, "tie_word_embeddings", False)
    state = {}
    if replica == 0:
        prefixes = owned_prefixes(stage)
        for name, tensor in stage.base.state_dict().items():
            if any(name.startswith(q) for q in prefixes) and not (tied and name == "lm_head.weight"):
                state[name] = tensor.detach().cpu().contiguous()
    shard = f"model-{stage.index + 1:05d}-of-{stage.num_stages:05d}.safetensors"
    if state:
        save_file(state, str(tmp / shard), metadata={"format": "pt"})
    names = all_gather({name: shard for name in state})
    if dist.get_rank() == 0:
        weight_map = {k: v for part in names for k, v in part.items()}
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        stage.hf_config.save_pretrained(str(tmp))
        _copy_tokenizer(stage, tmp)


def _copy_tokenizer(stage: StageModel, target: Path) -> None:
    source = Path(stage.hf_config._name_or_path)
    for path in source.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "generation_config.json",
                                                              "vocab.json", "merges.txt", "chat_template.jinja"):
            shutil.copy2(path, target / path.name)
