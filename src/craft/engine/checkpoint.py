"""Training checkpoints: atomic, pruned to `max_checkpoints`, and complete enough to resume bit-for-bit.

Layout under the run directory `output_dir/<run>/`:
  checkpoints/step000012/rank00000.safetensors  per process: every tensor of its state (trainable parameters of
                                                 its stage, optimizer state, torch RNG state)
  checkpoints/step000012/rank00000.json         per process: the rest of that state (optimizer hyper-parameters
                                                 and scalars, python and numpy RNG states), tensors referenced by name
  checkpoints/step000012/meta.json              global state: step, epoch, step within the epoch, tokens, layout,
                                                 and the run's identity (`run_identity`: base model, data settings)

No pickle anywhere: a checkpoint directory someone hands to `--resume_from_checkpoint` is data, never code. A
directory holding a pickle file (`*.pt`, `*.pkl`, `*.bin`, as older checkpoints did) is refused without opening
it, and a damaged file is a one-line error. On load, the saved parameters must match the run's trainable
parameters by name and shape (resuming with another `lora_rank`, adapter kind or target list is an error naming
the tensor), and the base model and data settings must be the ones recorded (`check_same_run`, before anything
is written).
Writing goes to `checkpoints/.tmp-step000012/`; every rank fsyncs its file, all ranks meet at a barrier, then
rank 0 writes meta.json, fsyncs, renames the directory to its final name (atomic on POSIX) and prunes the oldest
complete checkpoints beyond `max_checkpoints`. A crash at any point leaves either the previous checkpoints only
(plus a `.tmp-*` directory that the next run removes) or the new complete one. The LR schedule is a function of
the step, so restoring the step restores the scheduler.

For tests, the environment variable `CRAFT_KILL_IN_CHECKPOINT=<step>` makes rank 0 SIGKILL itself after the
rank files of that step's checkpoint are written and before the rename.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from craft.engine.distributed import barrier
from craft.errors import UserError
from craft.export.checkpoint import base_identity, safetensors_file

# The settings that decide which token sequences exist and in which order the loader yields them; the saved data
# position (epoch, step within the epoch) indexes that order, so resuming with any of them changed would continue
# at a position of a different packing/shuffle. datasets: files, caps, drop_tails, prefixes; sequence_len: the
# packing; seed: the shuffle and the eval split; eval_fraction: the split; document_prefix/suffix: the text;
# micro_batch_size and gradient_accumulation_steps: how many sequences one step consumes.
# Deliberately NOT recorded (changeable on resume): epochs and max_steps (where the run stops; the loader's order of
# an epoch does not depend on them), lr, lr_scheduler, warmup_steps, beta1/2, eps, weight decay (optimizer settings
# a user may adjust mid-run, e.g. a lower lr after a loss spike; the checkpoint restores the tensors, not these),
# activation_checkpointing, chunk_size, model_dtype (how the same math is computed), checkpoint_interval_hours,
# max_checkpoints, evals_per_run/evals_per_epoch, eval_gradient_accumulation_steps (when and how often things are
# saved or measured). Adapter shape settings are checked against the saved tensors (`_check_parameters`), the
# process layout against `layout`.
DATA_KEYS = ("datasets", "sequence_len", "seed", "eval_fraction", "document_prefix", "document_suffix",
             "micro_batch_size", "gradient_accumulation_steps")


def run_identity(config, model_dir: Path, model_type: str) -> dict:
    """What a checkpoint must share with the run resuming it: the base model's identity (model_type, config.json
    sha256, as in an adapter's base_model.json) and the data settings of `DATA_KEYS`."""
    data = config.model_dump(include=set(DATA_KEYS), mode="json")
    return {"base": base_identity(model_dir, model_type), "data": {key: data[key] for key in DATA_KEYS}}


def check_same_run(checkpoint: Path, identity: dict) -> None:
    """Refuse to resume `checkpoint` with another base model or other data settings (one line naming the keys
    and both values). Checkpoints written before identities were recorded carry none and are not checked."""
    meta = read_meta(checkpoint)
    saved = meta.get("identity")
    if saved is None:
        return
    if saved["base"] != identity["base"]:
        raise UserError(f"checkpoint {checkpoint} was trained on another base model ({saved['base']['model_type']}, "
                        f"config.json sha256 {saved['base']['config_sha256'][:12]}); model_dir has "
                        f"{identity['base']['model_type']}, sha256 {identity['base']['config_sha256'][:12]}: resume "
                        f"with the model_dir it was written with")
    changed = [f"{key}={json.dumps(saved['data'].get(key))} in the checkpoint, {json.dumps(value)} now"
               for key, value in identity["data"].items() if saved["data"].get(key) != value]
    if changed:
        raise UserError(f"checkpoint {checkpoint} was written with other data settings ({'; '.join(changed)}): its "
                        f"data position would point into another packing; resume with the same settings")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"step{step:09d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step") and (p / "meta.json").is_file())


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of the parameters that require grad (what training changes)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def encode_state(obj, name: str, tensors: dict[str, torch.Tensor]):
    """A JSON-able copy of `obj` (nested dicts / lists / tuples of tensors, numpy arrays, numbers, strings, None)
    whose tensors are moved into `tensors` under path-like names and referenced as `{"tensor": name}`."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().clone().contiguous()
        return {"tensor": name}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, dict):  # keys keep their type (optimizer state is keyed by int)
        return {"dict": [[key, encode_state(value, f"{name}.{key}", tensors)] for key, value in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [encode_state(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {name}: cannot store a {type(obj).__name__} without pickle")


def decode_state(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of `encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "tensor" in obj:
        return tensors[obj["tensor"]]
    if "ndarray" in obj:
        return np.array(obj["ndarray"], dtype=obj["dtype"])
    if "tuple" in obj:
        return tuple(decode_state(v, tensors) for v in obj["tuple"])
    return {key: decode_state(value, tensors) for key, value in obj["dict"]}


def save_checkpoint(run_dir: Path, step: int, rank: int, module, optimizer, meta: dict, max_checkpoints: int) -> Path:
    """Collectively write the checkpoint of `step` (see the module docstring); returns its final path."""
    root = run_dir / "checkpoints"
    name = checkpoint_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {
        "model": trainable_state(module),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, "state", tensors)
    tensor_file, json_file = tmp / f"rank{rank:05d}.safetensors", tmp / f"rank{rank:05d}.json"
    save_file(tensors, str(tensor_file))
    json_file.write_text(json.dumps(encoded))
    for path in (tensor_file, json_file):
        _fsync_file(path)
    barrier()
    if rank == 0:
        if os.environ.get("CRAFT_KILL_IN_CHECKPOINT") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        meta_file = tmp / "meta.json"
        meta_file.write_text(json.dumps(meta, indent=2))
        _fsync_file(meta_file)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-max_checkpoints]:
            shutil.rmtree(old)
    barrier()
    return final


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete `.tmp-*` leftovers of a checkpoint write that was interrupted."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        for leftover in root.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"checkpoint file {path} is damaged (not JSON: {err})") from None


def read_meta(checkpoint: Path) -> dict:
    return _read_json(checkpoint / "meta.json")


def refuse_pickles(checkpoint: Path) -> None:
    """A checkpoint directory holding pickle files is refused without opening them."""
    pickles = sorted(p.name for p in checkpoint.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"checkpoint {checkpoint} holds pickle files ({', '.join(pickles)}), which can run code "
                        f"when loaded; craft checkpoints hold none (safetensors + JSON) and never load one")


def check_files(checkpoint: Path) -> None:
    """Before a resumed run writes anything: no pickle files, and every rank's files parse (headers only)."""
    refuse_pickles(checkpoint)
    read_meta(checkpoint)
    for tensor_file in sorted(checkpoint.glob("rank*.safetensors")):
        with safetensors_file(tensor_file):
            pass
        _read_json(tensor_file.with_suffix(".json"))


def read_rank_state(checkpoint: Path, rank: int) -> dict:
    """The state one rank saved (see `save_checkpoint`), read without pickle."""
    refuse_pickles(checkpoint)
    tensor_file = checkpoint / f"rank{rank:05d}.safetensors"
    if not tensor_file.is_file():
        raise UserError(f"checkpoint file {tensor_file} is missing")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"checkpoint file {tensor_file} is damaged ({err})") from None
    try:
        return decode_state(_read_json(checkpoint / f"rank{rank:05d}.json"), tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"checkpoint file {checkpoint / f'rank{rank:05d}.json'} is damaged ({err!r})") from None


def _check_parameters(checkpoint: Path, saved: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """The saved trainable tensors must be exactly the run's trainable parameters, with the same shapes."""
    trainable = {name: p for name, p in params.items() if p.requires_grad}
    hint = ("resume with the settings it was written with (lora_rank, use_control_adapters, full_fine_tune, "
            "target_modules, layers_to_transform, control_adapter_type)")
    missing, unexpected = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
    if missing or unexpected:
        detail = "; ".join(part for part in (
            f"{len(missing)} of this run's missing, e.g. '{missing[0]}'" if missing else "",
            f"{len(unexpected)} unknown to this run, e.g. '{unexpected[0]}'" if unexpected else "") if part)
        raise UserError(f"checkpoint {checkpoint} does not hold this run's trainable tensors ({detail}); {hint}")
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(trainable[name].shape):
            raise UserError(f"checkpoint {checkpoint}: tensor '{name}' has shape {tuple(tensor.shape)}, this run's "
                            f"has {tuple(trainable[name].shape)}; {hint}")


def load_checkpoint(checkpoint: Path, rank: int, module, optimizer, world_layout: dict) -> dict:
    """Restore this rank's trainable tensors, optimizer state and RNG from `checkpoint`; returns its meta."""
    meta = read_meta(checkpoint)
    if meta.get("layout") != world_layout:
        raise UserError(f"checkpoint {checkpoint} was written with {meta.get('layout')}; this run has "
                        f"{world_layout} (resume with the same number of processes and pipeline_stages)")
    state = read_rank_state(checkpoint, rank)
    params = dict(module.named_parameters())
    _check_parameters(checkpoint, state["model"], params)
    with torch.no_grad():
        for name, tensor in state["model"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return meta
