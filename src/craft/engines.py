"""Which engine runs a CRAFT trainer (DDP, DeepSpeed ZeRO, FSDP) and what CRAFT supports on each.

The objective is a submodule of the model (`craft.objective`), so every engine wraps, shards and reduces its
parameters; every forward goes through the engine's model. What differs is where the gradients live:

* DDP (and one process): full gradients in ``.grad``, all-reduced by DDP's hooks. Everything is supported.
* DeepSpeed ZeRO-1/2/3: gradients are reduced into partitions inside the engine's hooks; ZeRO-3 also
  partitions the parameters outside a forward. FSDP2 (``fully_shard``): gradients are reduce-scattered into
  sharded DTensors.

Every backward gives the objective's parameters a gradient, zero where a micro-batch does not use them
(`objective_zero`), on the engines that need one:

* DDP all-reduces every parameter's gradient in each synchronised backward and waits for all of them;
* DeepSpeed ZeRO-3 accumulates a window's gradients into per-parameter partition buffers that the window's first
  micro-batch *overwrites* (``micro_step_id == 0``: copy) and later ones add to. A parameter without a gradient in
  the first micro-batch (the objective, when the window starts with an SFT micro-batch of the paired strategy, or
  with a GradCache micro-batch's no-grad pass) keeps the previous step's gradient in its buffer, and the step uses
  ``g_prev + g_now``: the temperature moved twice as far as it should from step 2 on (measured). A zero gradient
  in every micro-batch overwrites the buffer. Outside a forward ZeRO-3 holds only a shard of each parameter, so the
  zero is a call of the objective module (`ContrastiveObjective.zero_touch`), and the objective is a ZeRO-3 "leaf"
  module (`prepare_objective`): its forward hooks gather all its parameters (head, temperature, balancing) at
  once, and the hooks on its outputs gather them again for their backward.

ZeRO-1/2 and FSDP2 keep no such buffer per parameter across micro-batches (gradients accumulate into reduced
shards or ``.grad``), so nothing is added there.

Combinations that cannot work raise a `UserError` when the trainer is built, naming the engine and the reason:

* ``craft_gradient_balancing`` "gradnorm" / "pcgrad" need each task's full gradient in ``.grad`` between
  backward and optimizer step (`craft.gradient_balancing`); ZeRO and FSDP keep only reduced shards there.
* FSDP version 1 flattens parameters into FlatParameters that exist only inside the wrapped forward, while the
  objective runs outside the model's forward; use FSDP2 (``fsdp_version: 2``).
* GradCache under DeepSpeed fp16: its chunk backward passes run outside the engine's loss scaler.
* FSDP version 1 requested on a CPU run: accelerate enables FSDP only on GPUs and other accelerators and
  otherwise trains plain DDP without a word; CRAFT says so instead. FSDP2 runs on CPU (`enable_cpu_fsdp2`).
"""

from __future__ import annotations

import os

import torch

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
    if engine.startswith("deepspeed") and args.craft_use_gradcache and args.fp16:
        raise UserError(f"craft_use_gradcache cannot run on {engine} with fp16: GradCache's chunk backward passes "
                        "run outside DeepSpeed's loss scaler; use bf16 or fp32")


def check_launch_environment(environ=None, accelerator_available: bool | None = None) -> None:
    """A `UserError` for an ``accelerate launch`` engine setting that fails later with someone else's traceback,
    read from the variables accelerate passes to each rank; call it before building the training arguments
    (accelerate's FSDP1 plugin and DeepSpeed's config parsing run there).

    * a DeepSpeed config file that does not exist (``deepspeed_config_file``): DeepSpeed would try to read the path
      as base64-encoded JSON and fail with a JSONDecodeError;
    * FSDP version 1 without a GPU: accelerate raises "no available devices" (and CRAFT cannot run FSDP1 anyway);
    * FSDP2 without a GPU with a full state dict (`enable_cpu_fsdp2` explains why), before any work is done.
    """
    environ = os.environ if environ is None else environ
    if accelerator_available is None:
        accelerator_available = torch.cuda.is_available()
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if path and path != "None" and not os.path.isfile(path):
            where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()}, where accelerate launch ran)"
            raise UserError(f"deepspeed_config_file {path!r} does not exist{where}")
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not accelerator_available:
        version = environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(f"fsdp_version {version} cannot run CRAFT, and not on CPU at all: FSDP version 1 "
                            "flattens parameters that exist only inside the wrapped forward; use fsdp_version: 2")
        if "FULL_STATE_DICT" in environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"):
            raise UserError("fsdp2 on CPU needs fsdp_state_dict_type SHARDED_STATE_DICT (accelerate launch "
                            "--fsdp_state_dict_type SHARDED_STATE_DICT): a full state dict is gathered by torch's "
                            "get_model_state_dict(cpu_offload=True), which returns unusable tensors when the shards "
                            "already live on the CPU")


def prepare_objective(engine: str, objective) -> None:
    """Before the engine wraps the model: on ZeRO-3 the objective is one leaf module (module docstring), so every
    call of it gathers all its parameters, which its submodules use outside their own forward."""
    if engine == "deepspeed-zero3":
        from deepspeed.utils import set_z3_leaf_module

        set_z3_leaf_module(objective, True)


def enable_cpu_fsdp2(trainer) -> None:
    """Switch accelerate's FSDP path on for a CPU run that asks for FSDP2 (``fsdp`` / ``fsdp_config`` with version
    2, or an ``accelerate launch`` FSDP config with ``fsdp_version: 2``).

    accelerate enables FSDP only on GPUs and other accelerators (its distributed type stays MULTI_CPU, and the model
    would silently be trained by DDP). FSDP2's ``fully_shard`` needs only all-gather and reduce-scatter, which gloo
    has, so on CPU CRAFT gives accelerate the plugin the Trainer built and the FSDP distributed type; accelerate's
    own FSDP2 preparation (``fully_shard`` of the decoder layers and the root, the objective included) then runs as
    on a GPU. Called right after the Trainer created its Accelerator.
    """
    if trainer.is_fsdp_enabled or trainer.accelerator.device.type != "cpu":
        return
    plugin_args = trainer.args.fsdp_plugin_args
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if plugin_args is not None:
        version = int(plugin_args.get("fsdp_version", 1))
    elif from_launcher:
        version, plugin_args = int(os.environ.get("FSDP_VERSION", "1")), {}
    else:
        return
    if version != 2:
        return  # FSDP1 on CPU: refused by check_engine_support
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if "FULL_STATE_DICT" in str(plugin.state_dict_type):
        raise UserError("fsdp2 on CPU needs fsdp_config state_dict_type 'SHARDED_STATE_DICT': a full state dict "
                        "(the default, 'FULL_STATE_DICT') is gathered by torch's "
                        "get_model_state_dict(cpu_offload=True), which returns unusable tensors when the shards "
                        "already live on the CPU (measured with torch "
                        f"{torch.__version__}), so no checkpoint or final model could be saved")
    state = trainer.accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def objective_zero(engine: str, objective, gradcache_chunk: bool = False) -> torch.Tensor | float:
    """A zero whose backward gives each of the objective's parameters a zero gradient, for a backward that does not
    use the objective (``gradcache_chunk``: a GradCache chunk's; else an SFT micro-batch's), on the engines that need
    one (module docstring); 0.0 elsewhere.

    DDP needs it in every such backward. ZeRO-3 needs it in micro-batches that do not use the objective at all: a
    GradCache micro-batch's loss step has already given it its gradient, and touching the leaf module again in the
    chunks' backward passes puts its parameters twice into one DeepSpeed reduction bucket (an assertion there).
    """
    if engine == "ddp" or (engine == "deepspeed-zero3" and not gradcache_chunk):
        return objective.zero_touch()
    return 0.0


def full_state_dict(engine: str, module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with full tensors on the CPU, gathered where the engine shards parameters (ZeRO-3:
    `GatheredParameters`; FSDP2: `DTensor.full_tensor`). A collective on those engines: call it on every rank."""
    if engine == "deepspeed-zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return _cpu_copies(module.state_dict())
    return _cpu_copies(module.state_dict())


def is_sharded(engine: str) -> bool:
    """Whether the engine holds only shards of the parameters outside a forward (ZeRO-3, FSDP)."""
    return engine == "deepspeed-zero3" or engine.startswith("fsdp")


def host_saves_no_model(trainer) -> bool:
    """Whether transformers' `Trainer.save_model` writes no model for ``trainer``: under FSDP it saves a
    FULL_STATE_DICT only, and with a sharded one (FSDP2 on CPU, `enable_cpu_fsdp2`) it writes nothing."""
    return bool(getattr(trainer, "is_fsdp_enabled", False)) and (
        "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type))


def _cpu_copies(state: dict) -> dict[str, torch.Tensor]:
    full = {key: value.full_tensor() if hasattr(value, "full_tensor") else value for key, value in state.items()}
    return {key: value.detach().cpu().clone() for key, value in full.items()}
