"""Which engine runs a CRAFT trainer (DDP, DeepSpeed ZeRO, FSDP) and what CRAFT supports on each.

The objective is a submodule of the model (`craft.objective`), so every engine wraps, shards and reduces its
parameters; every forward goes through the engine's model. What differs is where the gradients live:

* DDP (and one process): full gradients in ``.grad``, all-reduced by DDP's hooks. Everything is supported.
* DeepSpeed ZeRO-1/2/3: gradients are reduced into partitions inside the engine's hooks; ZeRO-3 also
  partitions the parameters outside a forward. FSDP2 (``fully_shard``): gradients are reduce-scattered into
  sharded DTensors.

Combinations that cannot work raise a `UserError` when the trainer is built, naming the engine and the reason:

* ``craft_gradient_balancing`` "gradnorm" / "pcgrad" need each task's full gradient in ``.grad`` between
  backward and optimizer step (`craft.gradient_balancing`); ZeRO and FSDP keep only reduced shards there.
* FSDP version 1 flattens parameters into FlatParameters that exist only inside the wrapped forward, while the
  objective runs outside the model's forward; use FSDP2 (``fsdp_version: 2``).
* GradCache under DeepSpeed fp16: its chunk backward passes run outside the engine's loss scaler.
* FSDP requested on a CPU run: accelerate enables FSDP only on GPUs and other accelerators and otherwise trains
  plain DDP without a word; CRAFT says so instead.
* DeepSpeed ZeRO-3 with the paired strategy: measured against one process on the global batch
  (tests/test_distributed_engines.py), the objective's parameters get a wrong gradient from the second optimizer
  step on (a contrastive micro-batch after an SFT micro-batch that did not use them), while the model's stay
  exact; self-align (the objective in every micro-batch) is exact. Until that is understood it is refused.
"""

from __future__ import annotations

from craft.errors import UserError
from craft.gradient_balancing import PER_TASK_GRADIENT_STRATEGIES


def engine_name(trainer) -> str:
    """"deepspeed-zero<stage>", "fsdp<version>", "ddp" (several processes) or "single"."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        stage = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
        return f"deepspeed-zero{stage}"
    if getattr(trainer, "is_fsdp_enabled", False):
        return f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    return "ddp" if trainer.accelerator.num_processes > 1 else "single"


def check_engine_support(trainer) -> None:
    """A `UserError` naming the engine and the reason for a CRAFT setting the trainer's engine cannot run."""
    engine, args = engine_name(trainer), trainer.args
    if getattr(args, "fsdp", None) and not getattr(trainer, "is_fsdp_enabled", False):
        raise UserError(f"fsdp={args.fsdp!r} is set but accelerate did not enable FSDP (it does "
                        f"on GPUs and other accelerators only; this run's device is {args.device}), so the model "
                        "would silently train unsharded, as DDP; drop the fsdp settings or run on an accelerator")
    if engine in ("ddp", "single"):
        return
    if args.craft_gradient_balancing in PER_TASK_GRADIENT_STRATEGIES:
        raise UserError(f"craft_gradient_balancing={args.craft_gradient_balancing!r} cannot run on {engine}: it "
                        "needs each task's full gradient in .grad, and the engine keeps only reduced shards there; "
                        "use DDP, or 'loss_scale' / 'uncertainty' balancing")
    if engine == "fsdp1":
        raise UserError("FSDP version 1 cannot run CRAFT: its FlatParameters exist only inside the wrapped forward, "
                        "and the contrastive objective runs outside it; set fsdp_version: 2 (FSDP2, fully_shard)")
    if engine == "deepspeed-zero3" and trainer.craft_strategy != "self_align":
        raise UserError("DeepSpeed ZeRO-3 with the paired strategy is refused: the contrastive objective's gradient "
                        "differs from the single-process one from the second step on (measured); use ZeRO-2 or "
                        "FSDP2 (fsdp_version: 2), or strategy='self_align'")
    if engine.startswith("deepspeed") and args.craft_use_gradcache and args.fp16:
        raise UserError(f"craft_use_gradcache cannot run on {engine} with fp16: GradCache's chunk backward passes "
                        "run outside DeepSpeed's loss scaler; use bf16 or fp32")
