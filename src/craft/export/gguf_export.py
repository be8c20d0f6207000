"""`craft export-gguf ADAPTER_DIR OUT.gguf --base BASE_DIR`: a llama.cpp LoRA adapter GGUF, written with `gguf`.

Input: a PEFT LoRA, or a Control Adapter (converted in memory as `craft convert` does, `--direction` /
`--strength` / `--block-rule`; the block rule is not measured here, default "mlp"). A multiplicative LoRA cannot be expressed in llama.cpp and is refused, as are LoRAs on
`embed_tokens` / `lm_head`.

What is written (llama.cpp's adapter conventions):

* metadata `general.architecture` = the family's llama.cpp architecture (`FamilyFacts.gguf_arch`),
  `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32);
* for each adapted projection of layer N, `blk.N.<name>.weight.lora_a` and `.weight.lora_b`, `<name>` from
  `FamilyFacts.gguf_names` (e.g. `attn_q`, `ffn_down`, `ffn_down_exps`), checked against the tensors the `gguf`
  package lists for the architecture; Mixtral's fused expert `gate_up_proj` is split into `ffn_gate_exps` and
  `ffn_up_exps`, as llama.cpp stores them (`gguf_tensors`). Arrays keep PyTorch's layout:
  lora_a is A `(r, in)` and lora_b is B `(out, r)` as numpy arrays, which GGUF stores with reversed dimensions
  (`ne = [in, r]` and `[r, out]`), the orientation llama.cpp checks against the base tensor (`ne = [in, out]`).
  Fused experts: A `(experts, r, in)`, B `(experts, out, r)`;
* scale: llama.cpp applies `alpha / r` with r read from each tensor. When every module has the same rank r and
  PEFT scale s, the file holds the LoRA's own A and B with `alpha = s·r` (the `lora_alpha`, or `lora_alpha·√r`
  for rsLoRA). Otherwise (per-module `rank_pattern` / `alpha_pattern`) each B is pre-multiplied by its scale and
  `alpha = 0`, which llama.cpp reads as "scale 1";
* rotary permutation: for the `llama` architecture (Llama, Mistral, Mixtral) llama.cpp's converter reorders the
  rows of q_proj and k_proj from Hugging Face's half-split rotary layout to llama.cpp's interleaved one — within each
  head of size d, new row `2j + t` is old row `t·d/2 + j` (j < d/2, t ∈ {0, 1}); heads = `num_attention_heads` for
  q, `num_key_value_heads` for k. The LoRA delta `B·A` has the rows of the weight in B, so the same permutation is
  applied to the rows of lora_b (A is unchanged). Other architectures are written unpermuted.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from craft.errors import UserError
from craft.export.checkpoint import BaseCheckpoint
from craft.export.control import (DEFAULT_BLOCK_RULE, add_control_options, additive_updates, base_dir_for,
                                  read_control_adapter_file, warn_if_approximate)
from craft.export.lora import LowRankUpdate, adapter_kind, read_lora, reject_embedding_updates
from craft.export.output import staged_file

_ROTARY_PERMUTED_ARCHS = ("llama",)
_OUT_TYPES = {"f32": np.float32, "f16": np.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="PEFT LoRA or Control Adapter directory")
    parser.add_argument("out_file", help="output .gguf file")
    parser.add_argument("--base", default=None,
                        help="base model directory (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--outtype", choices=tuple(_OUT_TYPES), default="f32", help="tensor data type")
    add_control_options(parser)
    parser.add_argument("--force", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> int:
    count = export_gguf(args.adapter_dir, args.out_file, args.base, args.outtype, args.direction, args.strength,
                        args.force, args.block_rule)
    print(f"wrote {count} LoRA tensor pairs to {args.out_file}")
    return 0


def export_gguf(adapter_dir, out_file, base_dir=None, outtype: str = "f32", direction: int = 1,
                strength: float = 1.0, force: bool = False, block_rule: str = DEFAULT_BLOCK_RULE) -> int:
    """Write the GGUF; returns the number of (lora_a, lora_b) pairs."""
    from gguf import GGUFType, GGUFWriter, Keys

    kind, config = adapter_kind(adapter_dir)
    if kind == "multiplicative":
        raise UserError(f"{adapter_dir} is a multiplicative LoRA, which llama.cpp cannot apply; export the "
                        "Control Adapter itself or an additive `craft convert` output")
    if kind == "control":
        adapter = read_control_adapter_file(adapter_dir)
        base = base_dir_for(adapter, base_dir)
        warn_if_approximate(adapter, block_rule)
        updates = additive_updates(adapter, base, direction, strength, block_rule)
    else:
        base_path = base_dir or config.get("base_model_name_or_path")
        if not base_path:
            raise UserError(f"{adapter_dir}: no base model recorded in adapter_config.json; pass --base BASE_DIR")
        base = BaseCheckpoint.open(base_path)
        base.check_adapter(Path(adapter_dir), config)
        updates = read_lora(adapter_dir)
    reject_embedding_updates(updates, "GGUF export")
    alpha, updates = _alpha_and_factors(updates)
    with staged_file(out_file, force) as staging:
        writer = GGUFWriter(staging, base.family.gguf_arch)
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        count = 0
        for name, update in updates.items():
            B = rotary_permuted(base, name, update.B)
            for tensor_name, half in gguf_tensors(base, name):
                rows = B.shape[-2] // 2
                part = B if half is None else B[..., half * rows:(half + 1) * rows, :]
                writer.add_tensor(f"{tensor_name}.lora_a", update.A.float().numpy().astype(_OUT_TYPES[outtype]))
                writer.add_tensor(f"{tensor_name}.lora_b", part.float().numpy().astype(_OUT_TYPES[outtype]))
                count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return count


def _alpha_and_factors(updates: dict[str, LowRankUpdate]) -> tuple[float, dict[str, LowRankUpdate]]:
    """llama.cpp's single `alpha` and the factors to store with it (see module docstring)."""
    pairs = {(update.rank, update.scale) for update in updates.values()}
    if len(pairs) == 1:
        rank, scale = pairs.pop()
        return scale * rank, updates
    return 0.0, {name: update.folded() for name, update in updates.items()}


def gguf_tensors(base: BaseCheckpoint, name: str) -> list[tuple[str, int | None]]:
    """llama.cpp tensors (`blk.N.<name>.weight`) holding the HF tensor `name`, each with the half (0: first, 1:
    second) of the rows it holds, None for all rows; every name is checked against the `gguf` package's tensor list
    for the architecture.

    `model.layers.N.<proj>.weight` (or a fused `model.layers.N.<proj>`) maps through `FamilyFacts.gguf_names`.
    llama.cpp keeps Mixtral's experts' gate and up projections as two tensors, `ffn_gate_exps` and `ffn_up_exps`,
    so a LoRA on the fused `mlp.experts.gate_up_proj` (rows: gate, then up) is split into both: same lora_a, the
    first / second half of lora_b's rows.
    """
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(?:\.weight)?", name)
    gguf_names = base.family.gguf_names
    if match is None or match.group(2) not in gguf_names:
        raise UserError(f"no llama.cpp tensor name for {name} in a {base.family.name} model "
                        f"(supported projections: {', '.join(gguf_names)})")
    layer, projection = match.groups()
    names = gguf_names[projection]  # a tuple: the fused rows split in order (see FamilyFacts.gguf_names)
    parts = [(names, None)] if isinstance(names, str) else list(zip(names, range(len(names))))
    known = _arch_tensor_names(base.family.gguf_arch)
    for short, _ in parts:
        if short not in known:
            raise UserError(f"llama.cpp architecture {base.family.gguf_arch!r} has no tensor blk.N.{short} "
                            f"(for {name}); it cannot carry this LoRA")
    return [(f"blk.{layer}.{short}.weight", half) for short, half in parts]


def _arch_tensor_names(arch: str) -> set[str]:
    """Per-block tensor base names llama.cpp defines for `arch` (from the `gguf` package's constants)."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    arch_ids = [arch_id for arch_id, arch_name in MODEL_ARCH_NAMES.items() if arch_name == arch]
    if not arch_ids:
        raise UserError(f"the gguf package does not know the llama.cpp architecture {arch!r}")
    prefix = "blk.{bid}."
    return {TENSOR_NAMES[t][len(prefix):] for t in MODEL_TENSORS[arch_ids[0]] if TENSOR_NAMES[t].startswith(prefix)}


def rotary_permuted(base: BaseCheckpoint, name: str, lora_b: torch.Tensor) -> torch.Tensor:
    """lora_b with llama.cpp's q/k row permutation applied where its converter permutes the weight."""
    if base.family.gguf_arch not in _ROTARY_PERMUTED_ARCHS:
        return lora_b
    if name.endswith("self_attn.q_proj.weight"):
        heads = int(base.config["num_attention_heads"])
    elif name.endswith("self_attn.k_proj.weight"):
        heads = int(base.config.get("num_key_value_heads") or base.config["num_attention_heads"])
    else:
        return lora_b
    return interleave_rotary_rows(lora_b, heads)


def interleave_rotary_rows(matrix: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from the half-split rotary layout (pairs (j, j + d/2), Hugging Face) to the
    interleaved one (pairs (2j, 2j + 1), llama.cpp's `llama` rope): new row 2j + t = old row t·d/2 + j."""
    rows = matrix.shape[0]
    return matrix.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(matrix.shape)
