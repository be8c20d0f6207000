"""Per-family facts about decoder-only models: the one place that knows where things live.

Every supported family stores its decoder layers at `model.model.layers`, its token embedding at
`model.model.embed_tokens`, its final norm at `model.model.norm` and its output projection at `model.lm_head`.
What differs, and what this table records, is how a decoder layer writes into the residual stream:

* `write_points` — submodules of a decoder layer whose output (first element if the module returns a tuple) is
  exactly what gets added to the residual stream. A sublayer Control Adapter transforms these outputs.
  Llama-style sequential blocks: `h += attn(norm1(h)); h += mlp(norm2(h))`, so the writes are the outputs of
  `self_attn` and `mlp`. Gemma 2 normalises a sublayer's output before adding it, so its writes are the outputs
  of `post_attention_layernorm` and `post_feedforward_layernorm`.
* `residual_projections` — the linear maps (or fused expert weights) whose outputs are (linear parts of) the
  writes: `o_proj` and `down_proj`; Mixtral's `mlp.experts.down_proj` is a fused (experts, hidden, inter)
  parameter. A sublayer Control Adapter W equals replacing each such weight P with (I + W)·P when no norm follows
  the projection — the basis of lossless conversion to LoRA.
* `parallel_block` — attention and MLP read the same normalised input and both add to the residual at once
  (Cohere): `h += attn(norm(h)) + mlp(norm(h))`. Block and sublayer targets then coincide.
* `norm_after_sublayer` — a norm sits between the projection and the residual add (Gemma 2): conversion to an
  additive LoRA on the projections can only approximate the adapter.
* `gguf_names` — llama.cpp tensor base names (`blk.N.<name>.weight`) for each projection, for GGUF LoRA export;
  a tuple means llama.cpp splits the fused projection's rows into that many equal parts, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

_LLAMA_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass(frozen=True)
class FamilyFacts:
    name: str
    write_points: tuple[str, ...] = ("self_attn", "mlp")
    residual_projections: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    parallel_block: bool = False
    norm_after_sublayer: bool = False
    gguf_names: dict[str, str | tuple[str, ...]] = field(default_factory=lambda: dict(_LLAMA_GGUF))
    gguf_arch: str = "llama"


FAMILIES: dict[str, FamilyFacts] = {
    "llama": FamilyFacts("llama"),
    "mistral": FamilyFacts("mistral"),
    "qwen2": FamilyFacts("qwen2", gguf_arch="qwen2"),
    "qwen3": FamilyFacts("qwen3", gguf_arch="qwen3"),
    "mixtral": FamilyFacts(
        "mixtral",
        residual_projections=("self_attn.o_proj", "mlp.experts.down_proj"),
        gguf_names={**{k: v for k, v in _LLAMA_GGUF.items() if not k.startswith("mlp.")},
                    # llama.cpp stores the fused expert gate/up rows as two tensors: gate rows first, then up
                    "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
                    "mlp.experts.down_proj": "ffn_down_exps"},
    ),
    "phi3": FamilyFacts(
        "phi3",
        gguf_names={"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
                    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
        gguf_arch="phi3",
    ),
    "cohere": FamilyFacts("cohere", parallel_block=True, gguf_arch="command-r"),
    "cohere2": FamilyFacts("cohere2", parallel_block=True, gguf_arch="cohere2"),
    "gemma2": FamilyFacts(
        "gemma2",
        write_points=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm_after_sublayer=True,
        gguf_arch="gemma2",
    ),
}


def family_of(model_or_config) -> FamilyFacts:
    """The facts for a model, PEFT-wrapped model, or config, by its `model_type`; a clear error if unsupported
    (`UserError`, a `ValueError`)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(FAMILIES)
        raise UserError(f"model type {model_type!r} is not supported; supported families: {supported}")
    return FAMILIES[model_type]


def unwrap_peft(model):
    """The underlying HF model of a PEFT-wrapped model (itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    """The `nn.ModuleList` of decoder layers of a causal LM, also when wrapped by PEFT."""
    return unwrap_peft(model).model.layers
