"""Model loading for one pipeline stage: only the stage's tensors are read (and quantized), then adapters added.

The whole model is first built on the `meta` device (no memory). The pipeline is the list
`[embedding, decoder layer 0, ..., decoder layer N-1, head]` (N + 2 items), cut into `pipeline_stages`
contiguous parts exactly as DeepSpeed's `partition_method="uniform"` cuts it. A stage materialises only the
modules of its own items and fills them from the safetensors files tensor by tensor (`safe_open`, single or
sharded checkpoints). With `load_in_4bit`, each `nn.Linear` of the stage's decoder layers becomes a
bitsandbytes NF4 `Linear4bit`, quantized as it is moved to the device. Then LoRA (PEFT), Control Adapters
(`craft.adapters`) or full fine-tuning is set up; adapter weights are initialised from a generator seeded by
(seed, parameter name), so the initial adapter does not depend on how the model is split into stages.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from craft.adapters.families import FamilyFacts, family_of
from craft.engine.config import TrainConfig
from craft.errors import UserError, first_line
from craft.export.checkpoint import safetensors_file

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def pipeline_parts(num_layers: int, num_stages: int) -> list[int]:
    """Stage boundaries over the N + 2 pipeline items: stage s owns items [parts[s], parts[s+1])."""
    from deepspeed.runtime.utils import partition_uniform

    return partition_uniform(num_items=num_layers + 2, num_parts=num_stages)


@dataclass
class StageModel:
    """The HF model (meta outside this stage) and which pipeline items this stage owns."""

    model: nn.Module            # the causal LM, PEFT-wrapped for LoRA
    hf_config: object
    family: FamilyFacts
    items: range                # owned pipeline items: 0 = embedding, 1..N = decoder layers, N+1 = head
    rotary: nn.Module           # rotary position embedding module (parameter-free), real on every stage
    mode: str                   # "lora" | "control" | "full"
    index: int = 0              # this stage's number
    num_stages: int = 1
    rotary_cache: dict = field(default_factory=dict)  # (positions shape, dtype, device) -> (cos, sin)

    @property
    def base(self) -> nn.Module:
        """The unwrapped causal LM."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    def owned_layer_indices(self) -> list[int]:
        return [i - 1 for i in self.items if 1 <= i <= self.num_layers]

    def owns_embedding(self) -> bool:
        return 0 in self.items

    def owns_head(self) -> bool:
        return self.num_layers + 1 in self.items


def read_hf_config(model_dir: str | Path, sequence_len: int | None = None):
    """The transformers config of `model_dir`; errors for a missing dir, unsupported family, too long sequence."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise UserError(f"model_dir '{model_dir}' is a file, not a directory (name the directory that holds "
                        f"config.json and the weights)")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model_dir '{model_dir}': no config.json (expected a local Hugging Face model directory)")
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{model_dir / 'config.json'}: not a usable model config ({first_line(err)})") from None
    try:
        family_of(hf_config)
    except ValueError as err:
        raise UserError(f"model_dir '{model_dir}': {err}") from None
    # Outputs record where their base came from; an absolute path keeps working from any directory.
    hf_config._name_or_path = str(model_dir.resolve())
    limit = getattr(hf_config, "max_position_embeddings", None)
    if sequence_len is not None and limit is not None and sequence_len > limit:
        raise UserError(f"sequence_len={sequence_len} exceeds the model's max_position_embeddings={limit}")
    return hf_config


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of `model_dir`; a directory without tokenizer files, or with broken ones, is a `UserError`
    (transformers would blame missing sentencepiece / tiktoken packages instead)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model_dir '{model_dir}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the base "
                        "model's tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # transformers raises many kinds here; all mean "these tokenizer files are unusable"
        raise UserError(f"model_dir '{model_dir}': cannot load its tokenizer ({first_line(err)})") from None


class CheckpointReader:
    """Reads named tensors from a single or sharded safetensors checkpoint, one tensor at a time."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index}: not a safetensors index (no JSON object with a weight_map)") from None
            self.files = {name: model_dir / file for name, file in weight_map.items()}
        elif (model_dir / "model.safetensors").is_file():
            single = model_dir / "model.safetensors"
            with safetensors_file(single) as handle:
                self.files = {name: single for name in handle.keys()}
        else:
            raise UserError(f"model_dir '{model_dir}': no model.safetensors or model.safetensors.index.json")

    def has(self, name: str) -> bool:
        return name in self.files or self._legacy_moe(name) is not None

    def _read(self, name: str) -> torch.Tensor:
        with safetensors_file(self.files[name]) as handle:
            return handle.get_tensor(name)

    def _legacy_moe(self, name: str) -> list[list[str]] | None:
        """Checkpoint names making up a fused Mixtral tensor in the per-expert layout transformers 5 writes:
        `gate_up_proj[e] = cat(w1_e, w3_e)`, `down_proj[e] = w2_e`, `mlp.gate` = `block_sparse_moe.gate`."""
        for fused, parts in ((".mlp.experts.gate_up_proj", ("w1", "w3")), (".mlp.experts.down_proj", ("w2",)),
                             (".mlp.gate.weight", None)):
            if not name.endswith(fused):
                continue
            stem = name[: -len(fused)] + ".block_sparse_moe"
            if parts is None:
                return [[stem + ".gate.weight"]] if stem + ".gate.weight" in self.files else None
            experts = []
            while f"{stem}.experts.{len(experts)}.{parts[0]}.weight" in self.files:
                experts.append([f"{stem}.experts.{len(experts)}.{p}.weight" for p in parts])
            return experts or None
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name` from the file headers alone (fused Mixtral experts: as `get` assembles)."""
        if name in self.files:
            with safetensors_file(self.files[name]) as handle:
                return tuple(handle.get_slice(name).get_shape())
        groups = self._legacy_moe(name)
        if len(groups) == 1 and len(groups[0]) == 1 and not name.endswith("_proj"):
            return self.shape(groups[0][0])
        parts = [self.shape(n) for n in groups[0]]
        return (len(groups), sum(p[0] for p in parts), *parts[0][1:])

    def key_for(self, name: str, tied: bool) -> str:
        """The checkpoint name holding the model's tensor `name` (a tied lm_head reads the embedding)."""
        if not self.has(name) and name == "lm_head.weight" and tied:
            name = "model.embed_tokens.weight"
        if not self.has(name):
            raise UserError(f"model_dir: tensor '{name}' is missing from the checkpoint")
        return name

    def get(self, name: str) -> torch.Tensor:
        if name in self.files:
            return self._read(name)
        groups = self._legacy_moe(name)
        if len(groups) == 1 and len(groups[0]) == 1 and not name.endswith("_proj"):
            return self._read(groups[0][0])
        return torch.stack([torch.cat([self._read(n) for n in group], dim=0) for group in groups])


def _owned_modules(base: nn.Module, items: range, num_layers: int) -> dict[str, nn.Module]:
    """Qualified name -> module for every module a stage owns (prefixes as in the checkpoint)."""
    owned = {}
    if 0 in items:
        owned["model.embed_tokens"] = base.model.embed_tokens
    for i in items:
        if 1 <= i <= num_layers:
            owned[f"model.layers.{i - 1}"] = base.model.layers[i - 1]
    if num_layers + 1 in items:
        owned["model.norm"] = base.model.norm
        owned["lm_head"] = base.lm_head
    return owned


def _quantize_linears(layer: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace every `nn.Linear` under `layer` by an NF4 `Linear4bit` holding the same (real) weight.

    The weights keep bitsandbytes' training layout for good. On a CPU with AVX512-BF16, `Linear4bit.forward` in
    eval mode with an input that needs no grad (an eval pass) repacks the weight in place into an inference layout
    (`packing_format_for_cpu`); from then on every forward, training ones included, takes the `gemv_4bit` kernel,
    which has no autograd: no gradient flows through the frozen base weights to the adapters of earlier layers
    (LoRA-A gradients were 56-100 % off). Clearing the module's `support_avx512bf16_for_cpu` flag turns that
    repacking off; eval then dequantizes like training does. (CUDA never repacks: its inference-only `gemv_4bit`
    is chosen per call, for a single-row input that needs no grad, which a training batch never is.)
    """
    import bitsandbytes as bnb

    for name, child in list(layer.named_children()):
        if type(child) is nn.Linear:
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4")
            quantized.support_avx512bf16_for_cpu = False  # (versions before the repacking lack the flag: harmless)
            quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(layer, name, quantized.to("cpu"))  # .to(device) quantizes
        else:
            _quantize_linears(child, compute_dtype)


def _materialize(base: nn.Module, owned: dict[str, nn.Module], reader: CheckpointReader, dtype: torch.dtype,
                 tie_word_embeddings: bool) -> None:
    """Allocate the owned modules on CPU and fill every parameter/buffer from the checkpoint (or `_init_weights`
    for non-persistent buffers such as Gemma 2's embedding scale)."""
    for prefix, module in owned.items():
        module.to_empty(device="cpu")
        for sub in module.modules():
            if any(name in sub._non_persistent_buffers_set for name, _ in sub.named_buffers(recurse=False)):
                base._init_weights(sub)
        state = module.state_dict()
        for name in state:
            tensor = reader.get(reader.key_for(f"{prefix}.{name}", tie_word_embeddings))
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        module.load_state_dict(state, strict=True, assign=False)


def name_seed(seed: int, name: str) -> int:
    """A seed derived from (seed, name): the same whichever stage or process computes it."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def _seeded_normal_(param: torch.Tensor, seed: int, name: str, std: float) -> None:
    """Fill `param` with N(0, std^2) from a generator seeded by (seed, name)."""
    generator = torch.Generator().manual_seed(name_seed(seed, name))
    values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
    with torch.no_grad():
        param.copy_(values.to(param.dtype))


def linear_module_names(base: nn.Module) -> list[str]:
    """Names (last component) of the linear maps inside the decoder layers: LoRA's default targets."""
    import bitsandbytes as bnb

    kinds = (nn.Linear, bnb.nn.Linear4bit)
    return sorted({name.rsplit(".", 1)[-1] for name, module in base.model.layers.named_modules()
                   if isinstance(module, kinds)})


def check_target_modules(base: nn.Module, target_modules: list[str]) -> None:
    """Every `target_modules` entry must name linear maps of the decoder layers (PEFT matches a module whose
    qualified name equals the entry or ends with '.' + entry); an entry matching none is a typo, not a no-op."""
    import bitsandbytes as bnb

    names = [name for name, module in base.model.layers.named_modules()
             if isinstance(module, (nn.Linear, bnb.nn.Linear4bit))]
    for target in target_modules:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise UserError(f"target_modules: '{target}' matches no linear map of the decoder layers; valid names: "
                            f"{', '.join(linear_module_names(base))}")


def _add_lora(base: nn.Module, config: TrainConfig, layers: list[int] | None, owned_names: list[str]) -> nn.Module:
    """PEFT LoRA on `target_modules` (default: every linear map of the decoder layers) of `layers`; factors
    initialised per parameter name (A ~ N(0, 1/(3 fan_in)), B = 0) so the split into stages does not matter."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules or linear_module_names(base), layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, lora_config)
    dtype = DTYPES[config.lora_weight_dtype]
    for name, param in model.named_parameters():
        if "lora_" not in name or param.is_meta or not any(f"{o}." in name for o in owned_names):
            continue
        param.data = param.data.to(dtype)
        if "lora_A" in name:
            # Kaiming-uniform-like scale (PEFT's default is kaiming_uniform(a=sqrt(5)): std = 1/sqrt(3*fan_in)).
            _seeded_normal_(param, config.seed, name, std=1.0 / math.sqrt(3 * param.shape[1]))
        else:
            param.data.zero_()
    return model


def _add_control_adapters(base: nn.Module, config: TrainConfig, layers: list[int] | None) -> nn.Module:
    """Control Adapters on `layers`; each adapter is re-initialised under a torch seed derived from (seed, layer)
    with the adapters' own initialisation, so a layer's initial adapter does not depend on the stage split."""
    from craft.adapters import ControlAdapter, ControlAdapterConfig, add_control_adapters, control_adapters

    ca_config = ControlAdapterConfig(
        rank=config.lora_rank, alpha=config.alpha, dropout=config.lora_dropout, layers_to_transform=layers,
        target=config.control_adapter_target, type=config.control_adapter_type, inverse=config.control_inverse,
        neumann_order=config.control_neumann_order, gamma=config.control_adapter_gamma,
        class0_lambda=config.control_class0_lambda, dtype=config.lora_weight_dtype)
    add_control_adapters(base, ca_config)
    for adapter in control_adapters(base):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(config.seed, f"control_adapter.{adapter.layer_index}"))
            fresh = ControlAdapter(adapter.hidden_size, ca_config, adapter.layer_index, device="cpu")
        adapter.load_state_dict(fresh.state_dict())
    return base


def _meta_model(hf_config, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `hf_config` on the meta device: module structure and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def check_model_dir(config: TrainConfig) -> None:
    """What can be known about `model_dir` without reading weights, checked before a run writes anything: every
    tensor the model needs is in the safetensors headers with the shape config.json implies, and every
    `target_modules` entry names linear maps of the decoder layers."""
    hf_config = read_hf_config(config.model_dir, config.sequence_len)
    base = _meta_model(hf_config, DTYPES[config.model_dtype])
    if config.target_modules is not None and not config.full_fine_tune:
        check_target_modules(base, config.target_modules)
    reader = CheckpointReader(Path(config.model_dir))
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for name, tensor in base.state_dict().items():
        key = reader.key_for(name, tied)
        if reader.shape(key) != tuple(tensor.shape):
            raise UserError(f"model_dir: tensor '{key}' has shape {reader.shape(key)} in the checkpoint, but "
                            f"config.json makes it {tuple(tensor.shape)}; config and weights do not match")


def load_stage(config: TrainConfig, stage: int, num_stages: int) -> StageModel:
    """Build the model for `stage` of `num_stages`: meta skeleton, own tensors loaded, adapters added.

    Only parameters of the trained kind require grad: LoRA/CA factors, or (full fine-tune) every parameter of
    the owned modules. Tied input/output embeddings are untied when they live on different stages.
    """
    model_dir = Path(config.model_dir)
    hf_config = read_hf_config(model_dir, config.sequence_len)
    dtype = DTYPES[config.model_dtype]
    num_layers = hf_config.num_hidden_layers
    if num_stages > num_layers + 2:
        raise UserError(f"pipeline_stages={num_stages} exceeds the number of pipeline items ({num_layers} layers "
                        f"+ embedding + head)")
    parts = pipeline_parts(num_layers, num_stages)
    items = range(parts[stage], parts[stage + 1])
    reader = CheckpointReader(model_dir)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    if tied and config.full_fine_tune and num_stages > 1:
        raise UserError("full_fine_tune of a model with tied input/output embeddings needs pipeline_stages = 1 "
                        "(the tied matrix would live on two stages)")
    base = _meta_model(hf_config, dtype)
    if tied and not (0 in items and num_layers + 1 in items):
        base.lm_head.weight = nn.Parameter(torch.empty_like(base.lm_head.weight))  # untie across stages
    owned = _owned_modules(base, items, num_layers)
    _materialize(base, owned, reader, dtype, tied)
    if tied and 0 in items and num_layers + 1 in items:
        base.lm_head.weight = base.model.embed_tokens.weight
    if config.load_in_4bit:
        for prefix, module in owned.items():
            if prefix.startswith("model.layers."):
                _quantize_linears(module, dtype)
    with torch.device("cpu"):
        rotary = type(base.model.rotary_emb)(config=hf_config)
    for param in base.parameters():
        param.requires_grad_(False)
    layers = config.layer_indices(num_layers)
    if config.full_fine_tune:
        mode, model = "full", base
        for module in owned.values():
            for param in module.parameters():
                param.requires_grad_(True)
    elif config.use_control_adapters:
        mode, model = "control", _add_control_adapters(base, config, layers)
    else:
        mode, model = "lora", _add_lora(base, config, layers, list(owned))
    for param in model.parameters():
        if param.requires_grad and not param.is_meta and not param.is_contiguous():
            param.data = param.data.contiguous()  # e.g. a QR factor; DeepSpeed's broadcast needs flat storage
    return StageModel(model=model, hf_config=hf_config, family=family_of(hf_config), items=items, rotary=rotary,
                      mode=mode, index=stage, num_stages=num_stages)
