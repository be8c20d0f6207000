"""`craft plan CONFIG.toml [--gpus N] [--gpu-memory 24GiB] [--set key=value ...]`: the peak memory of each pipeline stage of a `craft train` config, from `config.json` and the TOML.

No weight is read: the model is built on the `meta` device (shapes only) to count the parameters of every
pipeline item exactly, for every family. Notation: T = micro_batch_size * sequence_len tokens per micro-batch,
H hidden size, I intermediate size (x experts per token for MoE), D_kv = kv heads * head dim, n_h attention heads,
V vocabulary, r rank, b = bytes per element of the model dtype (bf16 2, float32 4), b_a of the trained parameters
(lora_weight_dtype; the model dtype for full fine-tuning), L_s decoder layers on stage s, S stages,
GA = gradient_accumulation_steps. Stage s owns the items `pipeline_parts` gives it (embedding, layers, head).

Terms (bytes), per stage s:

* weights — every owned parameter at b bytes, except with `load_in_4bit` the decoder layers' linear weights at
  NF4's 0.5 byte + 1/64 byte of block statistics (64-element blocks, double-quantised absmax) per element.
* trainable — P_t trained elements (LoRA factors r*(in + out) per target, Control Adapters 2*r*H per layer, or
  every owned parameter) x b_a x (1 value + 1 gradient + 2 Adam moments + 1 Kahan buffer when b_a = 2).
* activations — in_flight = min(S - s, GA) micro-batches (DeepSpeed's 1F1B schedule) each holding:
  checkpointing true: L_s * T * H * b (each layer's input) + 16 T (the int64 classes and mask);
  "offload": 16 T (the layer inputs live in CPU memory: L_s * T * H * b of pinned host RAM, reported apart);
  false: L_s * A(T), where A(T) = T * (c_H H + c_I I + c_kv D_kv + c_r r + c_h n_h + c_0) is what one decoder
  layer saves for backward. The c are bytes per token measured on a Llama block with saved-tensor hooks (torch
  2.13, transformers 5; `ACTIVATION_BYTES` below); they hold exactly for Llama/Mistral/Qwen-style blocks and are
  an estimate for the others.
* recompute — one layer's working set in backward: A(T) (checkpointing recomputes it) + the gradient transients
  G(T) = T * g * I (g = 6 bytes for adapters, 0.85 b for full fine-tuning; measured likewise). Without
  checkpointing only G(T).
* loss (last stage) — chunked (chunk_size = c > 0, c <= T): one chunk's float32 logits, overwritten by their
  gradient, plus below float32 the model-dtype logits and the gradient cast back: c * V * (4 + 2 b [b < 4]) bytes;
  plain (chunk_size = 0, c = T): F.cross_entropy's logits, log-softmax and gradient, c * V * 12 bytes. Both measured
  exactly (every allocation and free in time order, profiler memory records) in float32 and bf16; plus
  c * V * b with a softcap or logit_scale (an estimate: tanh keeps its output), plus the normed hidden states and
  their gradient, T * H * (b + 4).
* buffers — DeepSpeed's pipeline buffers: each in-flight micro-batch's stage output (T * H * b), on stages after
  the first its received input too, and with S > 1 one gradient message T * H * b.

Peak of a stage = weights + trainable + activations + buffers + max(recompute, loss): the loss's backward runs
first and is freed before the layers recompute one at a time. The prediction is tensor bytes (what `torch.cuda.max_memory_allocated` counts). A job fits when the largest stage
plus `RUNTIME_BYTES` (CUDA context, allocator slack) is at most the GPU memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from craft.engine.config import TrainConfig
from craft.errors import UserError

GIB = 2 ** 30
RUNTIME_BYTES = 1 * GIB
NF4_BYTES = 0.5 + 1 / 64

# (mode, model dtype bytes) -> bytes per token per (H, I, D_kv, r, n_h, 1) saved by one decoder layer's forward.
ACTIVATION_BYTES = {
    ("lora", 4): (20.0, 16.0, 8.0, 28.0, 4.0, 8.0),
    ("lora", 2): (36.0, 10.0, 4.0, 28.0, 4.0, 8.0),   # float32 LoRA factors: each target casts its input up
    ("full", 4): (28.0, 16.0, 8.0, 0.0, 4.0, 8.0),
    ("full", 2): (20.0, 8.0, 4.0, 0.0, 4.0, 8.0),
    ("control", 4): (20.6, 12.0, 8.0, 26.6, 3.7, 0.0),
    ("control", 2): (20.6, 6.0, 4.0, 26.6, 3.7, 0.0),
}
TERMS = ("weights", "trainable", "activations", "recompute", "loss", "buffers")


@dataclass
class StagePlan:
    stage: int
    items: range
    bytes: dict[str, float] = field(default_factory=dict)
    host_bytes: float = 0.0  # offloaded layer inputs (CPU RAM)

    @property
    def total(self) -> float:
        """Peak: everything held through the step, plus the larger of the two backward working sets (the loss's
        runs first, at the head, and is freed before the layers recompute one by one)."""
        held = sum(v for k, v in self.bytes.items() if k not in ("recompute", "loss"))
        return held + max(self.bytes["recompute"], self.bytes["loss"])


@dataclass
class Plan:
    stages: list[StagePlan]
    num_stages: int
    gpus: int
    gpu_memory: float | None

    @property
    def peak(self) -> float:
        return max(stage.total for stage in self.stages)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.peak + RUNTIME_BYTES <= self.gpu_memory


def parse_size(text: str) -> float:
    """'24GiB', '24 GB', '80G', '512MiB' -> bytes (GB and G are read as GiB: GPU memory is quoted that way). The
    unit is required (a bare 24 would be 24 bytes) and the size must be positive."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT])(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--gpu-memory: cannot read {text!r} as a positive size with a unit; write e.g. 24GiB or 80GB")
    return float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper())


class ModelShape:
    """Parameter counts of a model's pipeline items, from its config: a one-layer copy of the model is built on the
    `meta` device (decoder layers all have the same parameters), so even a 70B model takes a moment."""

    def __init__(self, hf_config, config: TrainConfig):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        from craft.engine.model import linear_module_names

        one_layer = copy.deepcopy(hf_config)
        one_layer.num_hidden_layers = 1
        if getattr(one_layer, "layer_types", None) is not None:
            one_layer.layer_types = one_layer.layer_types[:1]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(one_layer)
        self.hidden = hf_config.hidden_size
        self.vocab = hf_config.vocab_size
        self.heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or self.hidden // self.heads
        self.kv_dim = getattr(hf_config, "num_key_value_heads", self.heads) * head_dim
        experts = getattr(hf_config, "num_experts_per_tok", 1) or 1
        self.intermediate = hf_config.intermediate_size * experts
        self.num_layers = hf_config.num_hidden_layers
        self.tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.scaled_logits = (getattr(hf_config, "final_logit_softcapping", None) is not None
                              or getattr(hf_config, "logit_scale", None) is not None)
        layer = model.model.layers[0]
        self.layer_params = sum(p.numel() for p in layer.parameters())
        targets = set(config.target_modules or linear_module_names(model))
        linears = [(name.rsplit(".", 1)[-1], m) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        self.layer_linear_params = sum(m.weight.numel() for _, m in linears)
        self.lora_layer = sum(config.lora_rank * (m.in_features + m.out_features) for name, m in linears
                              if name in targets) if config.lora_rank else 0
        self.lora_targets = sum(1 for name, _ in linears if name in targets)
        self.embedding = model.model.embed_tokens.weight.numel()
        self.head = model.lm_head.weight.numel() + sum(p.numel() for p in model.model.norm.parameters())
        self.lora_head = config.lora_rank * (self.hidden + self.vocab) if "lm_head" in targets and config.lora_rank \
            else 0


def plan(config: TrainConfig, hf_config, gpus: int | None = None, gpu_memory: float | None = None,
         num_stages: int | None = None, shape: ModelShape | None = None) -> Plan:
    """Per-stage peak memory of `config` run as `num_stages` stages (default `pipeline_stages`) on `gpus`."""
    from craft.engine.model import DTYPES, pipeline_parts

    shape = shape or ModelShape(hf_config, config)
    num_stages = num_stages or config.pipeline_stages
    gpus = gpus or num_stages
    mode = "full" if config.full_fine_tune else "control" if config.use_control_adapters else "lora"
    b = DTYPES[config.model_dtype].itemsize
    b_a = b if mode == "full" else DTYPES[config.lora_weight_dtype].itemsize
    tokens = config.micro_batch_size * config.sequence_len
    hidden_bytes = tokens * shape.hidden * b
    adapted = set(config.layer_indices(shape.num_layers) or range(shape.num_layers))
    activation = _layer_activation(shape, config, mode, b) * tokens
    gradients = tokens * shape.intermediate * (6.0 if mode != "full" else 0.85 * b)
    parts = pipeline_parts(shape.num_layers, num_stages)
    stages = []
    for s in range(num_stages):
        items = range(parts[s], parts[s + 1])
        layers = [i - 1 for i in items if 1 <= i <= shape.num_layers]
        has_embedding, has_head = 0 in items, shape.num_layers + 1 in items
        in_flight = min(num_stages - s, config.gradient_accumulation_steps)
        weights = _layer_weight_bytes(shape, config, b) * len(layers)
        weights += shape.embedding * b * has_embedding
        weights += (shape.head - (shape.embedding if shape.tied and has_embedding else 0)) * b * has_head
        if mode == "full":
            trained = shape.layer_params * len(layers) + shape.embedding * has_embedding + shape.head * has_head
        elif mode == "control":
            trained = 2 * config.lora_rank * shape.hidden * len(adapted & set(layers))
        else:
            trained = shape.lora_layer * len(adapted & set(layers)) + shape.lora_head * has_head
        per_micro_batch = {True: len(layers) * hidden_bytes + 16 * tokens, "offload": 16 * tokens,
                           False: len(layers) * activation}[config.activation_checkpointing]
        chunk = tokens if config.chunk_size == 0 else min(config.chunk_size, tokens)
        per_logit = 12 if config.chunk_size == 0 else 4 + 2 * b * (b < 4)
        loss = chunk * shape.vocab * (per_logit + b * shape.scaled_logits) + tokens * shape.hidden * (b + 4)
        plan_s = StagePlan(s, items)
        plan_s.bytes = {
            "weights": weights,
            "trainable": trained * b_a * (4 + (b_a == 2)),
            "activations": in_flight * per_micro_batch,
            "recompute": (gradients + (activation if config.activation_checkpointing else 0)) if layers else 0,
            "loss": loss if has_head else 0,
            "buffers": hidden_bytes * (in_flight * (1 + (s > 0)) + (num_stages > 1)),
        }
        if config.activation_checkpointing == "offload":
            plan_s.host_bytes = in_flight * len(layers) * hidden_bytes
        stages.append(plan_s)
    return Plan(stages, num_stages, gpus, gpu_memory)


def _layer_activation(shape: ModelShape, config: TrainConfig, mode: str, b: int) -> float:
    """A(T) / T: bytes per token one decoder layer saves for backward (module docstring)."""
    c_h, c_i, c_kv, c_r, c_heads, c_0 = ACTIVATION_BYTES[(mode, b)]
    if mode == "lora":  # the measured 28 = 7 targets x 4 bytes per rank
        c_r = 4.0 * shape.lora_targets
    rank = config.lora_rank or 0
    return (c_h * shape.hidden + c_i * shape.intermediate + c_kv * shape.kv_dim + c_r * rank
            + c_heads * shape.heads + c_0)


def _layer_weight_bytes(shape: ModelShape, config: TrainConfig, b: int) -> float:
    if not config.load_in_4bit:
        return shape.layer_params * b
    return shape.layer_linear_params * NF4_BYTES + (shape.layer_params - shape.layer_linear_params) * b


def smallest_fitting_stages(config: TrainConfig, hf_config, gpus: int, gpu_memory: float,
                            shape: ModelShape | None = None) -> int | None:
    """The smallest number of pipeline stages dividing `gpus` whose largest stage fits (None if none does)."""
    shape = shape or ModelShape(hf_config, config)
    for stages in range(1, min(gpus, hf_config.num_hidden_layers + 2) + 1):
        if gpus % stages == 0 and plan(config, hf_config, gpus, gpu_memory, stages, shape).fits:
            return stages
    return None


def format_plan(result: Plan) -> str:
    """The per-stage table (GiB) and the verdict."""
    header = f"{'stage':>5} {'items':>9} " + " ".join(f"{t:>11}" for t in TERMS) + f" {'total':>8}"
    lines = [header]
    for stage in result.stages:
        items = f"{stage.items.start}-{stage.items.stop - 1}"
        cells = " ".join(f"{stage.bytes[t] / GIB:11.2f}" for t in TERMS)
        lines.append(f"{stage.stage:>5} {items:>9} {cells} {stage.total / GIB:8.2f}")
    host = sum(stage.host_bytes for stage in result.stages)
    if host:
        lines.append(f"offloaded layer inputs in CPU memory: {host / GIB:.2f} GiB (pinned)")
    lines.append(f"predicted peak: {result.peak / GIB:.2f} GiB per GPU (largest stage; + {RUNTIME_BYTES / GIB:.0f} "
                 f"GiB CUDA context and allocator slack)")
    return "\n".join(lines)


def describe(config: TrainConfig, hf_config, gpus: int | None, gpu_memory: float | None) -> str:
    """What `craft plan` prints: the table for the configured stages, whether it fits, the smallest that does."""
    gpus = gpus or config.pipeline_stages
    if gpus % config.pipeline_stages:
        raise UserError(f"--gpus {gpus} is not a multiple of pipeline_stages={config.pipeline_stages}")
    shape = ModelShape(hf_config, config)
    result = plan(config, hf_config, gpus, gpu_memory, shape=shape)
    text = [f"{config.pipeline_stages} pipeline stage(s) x {gpus // config.pipeline_stages} replica(s), "
            f"{config.micro_batch_size} x {config.sequence_len} tokens per micro-batch, activation_checkpointing = "
            f"{str(config.activation_checkpointing).lower()}, chunk_size = {config.chunk_size}",
            format_plan(result)]
    if gpu_memory is not None:
        budget = f"{gpu_memory / GIB:.4g} GiB"
        text.append(f"fits on {gpus} x {budget}: {'yes' if result.fits else 'no'}")
        smallest = smallest_fitting_stages(config, hf_config, gpus, gpu_memory, shape)
        if smallest is None:  # how many GPUs (one stage each) would it take?
            most = hf_config.num_hidden_layers + 2
            needed = next((n for n in range(gpus + 1, most + 1)
                           if plan(config, hf_config, n, gpu_memory, n, shape).fits), None)
            smallest = f"none on {gpus} GPU(s); " + (f"pipeline_stages = {needed} on {needed} GPUs fits" if needed
                                                    else "no number of stages fits")
        text.append(f"smallest pipeline_stages that fits: {smallest}")
    return "\n".join(text)


def run_summary_line(result: Plan) -> str:
    """The one line `craft train` prints at start."""
    stages = ", ".join(f"{stage.total / GIB:.2f}" for stage in result.stages)
    return f"craft train: predicted peak memory per stage (GiB, `craft plan` for the terms): {stages}"


def add_arguments(parser) -> None:
    parser.add_argument("config", help="TOML training config (only model_dir/config.json is read, no weights)")
    parser.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: pipeline_stages)")
    parser.add_argument("--gpu-memory", dest="gpu_memory", default=None, metavar="SIZE",
                        help="memory of one GPU, e.g. 24GiB; then say whether the job fits and the smallest "
                             "pipeline_stages that does")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a top-level config key, as in `craft train`")


def run(args) -> int:
    from craft.engine.config import load_config
    from craft.engine.model import read_hf_config

    config = load_config(args.config, args.overrides)
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}")
    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    hf_config = read_hf_config(config.model_dir, config.sequence_len)
    config.layer_indices(hf_config.num_hidden_layers)
    print(describe(config, hf_config, args.gpus, gpu_memory))
    return 0
