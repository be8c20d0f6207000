"""The training loop of `craft train`: DeepSpeed pipeline engine, torch-optimi Adam, LR schedule, composite
weight decay, evaluation, checkpoints, TensorBoard, progress bar and final summary.

One optimizer step = `gradient_accumulation_steps` micro-batches per data-parallel replica through the pipeline
(`engine.train_batch`), the mean micro-batch loss being optimised, then (decoupled, after Adam):
composite weight decay `A -= lr*lambda*s*B^T W`, `B -= lr*lambda*s*W A^T` on every LoRA / lowrank Control Adapter
pair (`lora_weight_decay`), and the orthogonality step for symmetric Control Adapters.

Learning-rate schedule (the seed README documents no schedule; qlora-pipe-lite's documented behaviour is a fixed
`lr`): `lr_scheduler = "seed"` (default) and `"constant"` are a constant rate after a linear warmup,
`lr * min(1, (step + 1) / warmup_steps)`; `"cosine"` decays after the warmup to 0 at the last step,
`lr * (1 + cos(pi * progress)) / 2`. `warmup_steps` defaults to min(100, total_steps // 20): a short warmup.

Files under `output_dir/<run>/` (`<run>` = start time, `YYYYmmdd_HH-MM-SS`): `epochN/` (adapter or model after
epoch N), `checkpoints/`, `tensorboard/` (scalars below), `losses.jsonl` (one JSON line per step and per eval),
`config.toml` (the validated settings). TensorBoard tags: train/loss, train/lr, train/norm_avg, train/norm_max,
train/weight_decay_avg, train/weight_decay_max, train/aux_loss, train/tokens_per_second, eval/loss.

For tests, `CRAFT_KILL_AT_STEP=<k>` makes the process SIGKILL itself right after step k (1-based) is logged and
checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from craft.adapters.regularizers import lowrank_frobenius
from craft.engine import checkpoint as ckpt
from craft.engine.allocator import configure_cpu_allocator
from craft.engine.config import TrainConfig
from craft.engine.data import MicroBatches, load_or_build
from craft.engine.distributed import (agree_on_errors, all_gather, barrier, broadcast_from_zero, distributed_world,
                                      make_topology, run_on_zero, stage_and_replica)
from craft.engine.model import check_model_dir, load_stage, load_tokenizer, read_hf_config
from craft.engine.outputs import save_epoch_output
from craft.engine.pipeline import AuxLossMeter, build_pipeline_module
from craft.errors import UserError
from craft.quiet import swallow_stdout


def warmup_steps_for(config: TrainConfig, total_steps: int) -> int:
    return config.warmup_steps if config.warmup_steps is not None else min(100, total_steps // 20)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps` (see the module docstring)."""
    warmup = warmup_steps_for(config, total_steps)
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if config.lr_scheduler == "cosine" and step >= warmup:
        progress = (step - warmup) / max(1, total_steps - warmup)
        factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * factor


def eval_schedule(total_steps: int, evals_per_run: int, steps_per_epoch: int | None = None,
                  evals_per_epoch: int | None = None) -> set[int]:
    """Steps after which to evaluate (0 = before the first step). `evals_per_run` evals evenly spaced from 0 to
    `total_steps` inclusive; or, with `evals_per_epoch` = n, at 0 and at e*S + round(i*S/n) for every epoch e and
    i = 1..n (S = steps_per_epoch), the end of the run included."""
    if evals_per_epoch is not None:
        if evals_per_epoch <= 0:
            return set()
        epochs = math.ceil(total_steps / steps_per_epoch)
        points = {e * steps_per_epoch + round(i * steps_per_epoch / evals_per_epoch)
                  for e in range(epochs) for i in range(1, evals_per_epoch + 1)}
        return {0, total_steps} | {p for p in points if p <= total_steps}
    if evals_per_run <= 0:
        return set()
    if evals_per_run == 1:
        return {total_steps}
    return {round(i * total_steps / (evals_per_run - 1)) for i in range(evals_per_run)}


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint's meta.json."""

    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch (0-based)
    step_in_epoch: int = 0   # steps done in the current epoch
    tokens: int = 0          # tokens trained on (all replicas)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _find_resume_checkpoint(output_dir: Path, explicit: str) -> Path:
    """The checkpoint to resume: `explicit` if it is a path, else the newest one of the newest run."""
    if explicit != "latest":
        path = Path(explicit)
        if not (path / "meta.json").is_file():
            raise UserError(f"--resume_from_checkpoint {explicit}: not a complete checkpoint directory")
        return path
    runs = sorted(p for p in output_dir.iterdir() if p.is_dir() and ckpt.complete_checkpoints(p)) \
        if output_dir.is_dir() else []
    if not runs:
        raise UserError(f"--resume_from_checkpoint: no checkpoint found under output_dir '{output_dir}'")
    return ckpt.complete_checkpoints(runs[-1])[-1]


def _run_dir(config: TrainConfig, resume: str | None, rank: int) -> tuple[Path, Path | None]:
    def choose():
        output_dir = Path(config.output_dir)
        if resume:
            checkpoint = _find_resume_checkpoint(output_dir, resume)
            return str(checkpoint.parent.parent), str(checkpoint)
        run = output_dir / time.strftime("%Y%m%d_%H-%M-%S")
        suffix = 1
        while run.exists():
            run, suffix = output_dir / f"{time.strftime('%Y%m%d_%H-%M-%S')}_{suffix}", suffix + 1
        return str(run), None

    run_dir, checkpoint = run_on_zero(choose, rank)
    return Path(run_dir), Path(checkpoint) if checkpoint else None


def _optimizer(params, config: TrainConfig):
    """torch-optimi Adam; Kahan summation is switched on automatically for low-precision parameters."""
    from optimi import Adam

    return Adam(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=0.0)


def _deepspeed_config(config: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "steps_per_print": 10**12,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "wall_clock_breakdown": False,
    }


def _factor_triples(module, mode: str) -> list:
    """(A, B, s) with W = s B A for every adapter of this stage (symmetric adapters as Q^T, Q diag(e^S - 1), 1)."""
    from craft.adapters import control_adapters, lora_factor_pairs

    if mode == "control":
        return [adapter.factors() for adapter in control_adapters(module)]
    return lora_factor_pairs(module) if mode == "lora" else []


def _post_step(module, config: TrainConfig, lr: float, mode: str) -> list[float]:
    """Decoupled regularisation after the Adam step: composite weight decay (returns ||Delta W||_F per decayed
    pair) and, for symmetric Control Adapters, the orthogonality step."""
    from craft.adapters import composite_weight_decay_, control_adapter_factor_pairs, lora_factor_pairs
    from craft.adapters import orthogonality_step_

    if mode == "full":
        return []
    pairs = control_adapter_factor_pairs(module) if mode == "control" else lora_factor_pairs(module)
    amounts = composite_weight_decay_(pairs, lr, config.lora_weight_decay)
    if mode == "control" and config.control_adapter_type == "symmetric":
        orthogonality_step_(module, config.control_adapter_gamma)
    return amounts


@torch.no_grad()
def _frobenius_norms(triples) -> list[float]:
    """||s B A||_F of each (A, B, s) triple, per adapter (the stages' values are combined across ranks)."""
    return [abs(s) * float(lowrank_frobenius(b.detach().float(), a.detach().float())) for a, b, s in triples]


def _combine(parts: list[dict], replicas: int, accumulation: int) -> dict:
    """Global adapter norm / decay averages and maxima over all ranks (replicas hold identical copies, so
    averages are unchanged by counting each once per replica), and the aux loss per micro-batch."""
    out = {"train/aux_loss": sum(p["aux"] for p in parts) / (replicas * accumulation)}
    for key in ("norm", "weight_decay"):
        values = [v for p in parts for v in p[key]]
        if values:
            out[f"train/{key}_avg"] = sum(values) / len(values)
            out[f"train/{key}_max"] = max(values)
    return out


def _drop_records_after(path: Path, step: int) -> None:
    """Rewrite `path` (JSON lines with a "step") keeping the records of steps <= `step`, atomically. A line
    torn by a kill in the middle of its write is dropped too."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if keep(line)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _wait_for_a_later_event_file_name(directory: Path) -> None:
    """Event files are named `events.out.tfevents.<unix seconds>.<host>.<pid>...` and TensorBoard reads them in name
    order. A run resumed within the same second as an earlier one could sort *before* it, and the earlier file's
    purge would then hide the new steps; so wait (at most a second) until the new file's name sorts last."""
    stamps = [int(p.name.split(".")[3]) for p in directory.glob("events.out.tfevents.*")
              if p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class RunLog:
    """Rank 0's outputs: TensorBoard scalars, `losses.jsonl`, the progress bar."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, show_progress: bool,
                 resumed: bool = False):
        self.enabled = enabled
        self.writer = self.bar = self.lines = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        # A resumed run replays the steps after its checkpoint: their records from the interrupted run go, so every
        # step is logged once (TensorBoard hides events from `purge_step` on; losses.jsonl is cut the same way).
        purge = start_step + 1 if resumed else None
        _wait_for_a_later_event_file_name(run_dir / "tensorboard")
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if resumed:
            _drop_records_after(run_dir / "losses.jsonl", start_step)
        self.lines = open(run_dir / "losses.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not show_progress, unit="step",
                        dynamic_ncols=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        record = {"step": step, **{k.replace("/", "_"): v for k, v in values.items()}}
        self.lines.write(json.dumps(record) + "\n")
        self.lines.flush()
        os.fsync(self.lines.fileno())

    def advance(self, loss: float, tokens_per_second: float) -> None:
        if self.enabled:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.lines.close()


def _evaluate(engine, batches: MicroBatches) -> float | None:
    """Mean eval loss over all eval batches (None when the eval split fills no batch)."""
    if batches.steps == 0:
        return None
    iterator = batches.iterate(epoch=0)
    losses = [float(engine.eval_batch(iterator, num_micro_batches=batches.accumulation))
              for _ in range(batches.steps)]
    return sum(losses) / len(losses)


def check_output_dir(output_dir: str) -> None:
    """`output_dir` must be a directory or creatable as one: no part of the path may be a file."""
    path = Path(output_dir)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == path else f"lies under the file {part}"
            raise UserError(f"output_dir '{output_dir}' {what}; output_dir must be a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir '{output_dir}': {existing} is not writable")


def train(config: TrainConfig, resume: str | None = None, show_progress: bool = True, verbose: bool = False) -> dict:
    """Run (or resume) the training described by `config` in this process's place in the world; returns the
    summary (on every rank). `resume`: None, "latest", or a checkpoint directory. Unless `verbose`, what
    third-party libraries print while the run is set up is discarded (`craft.quiet`)."""
    if not torch.cuda.is_available():
        configure_cpu_allocator()  # glibc would keep freed activations resident: craft.engine.allocator
    # Fail before anything is written (the dataset cache included) on every mistake found without training.
    hf_config = read_hf_config(config.model_dir, config.sequence_len)
    config.layer_indices(hf_config.num_hidden_layers)
    check_model_dir(config)
    check_output_dir(config.output_dir)
    if resume:
        checkpoint = _find_resume_checkpoint(Path(config.output_dir), resume)
        ckpt.check_files(checkpoint)
        ckpt.check_same_run(checkpoint, ckpt.run_identity(config, Path(config.model_dir), hf_config.model_type))
    with contextlib.ExitStack() as stack:
        with swallow_stdout(verbose):
            rank, world = stack.enter_context(distributed_world())
        if rank == 0 and show_progress:
            print(memory_plan(config, hf_config, world), flush=True)
        with swallow_stdout(verbose):
            run = TrainingRun(config, rank, world)
            run.start(resume, show_progress)
        return run.loop()


def memory_plan(config: TrainConfig, hf_config, world: int) -> str:
    """`craft plan`'s prediction for this run with this GPU's memory, printed when training starts. On CPU there is
    no GPU memory to predict or check (the plan's terms are CUDA allocations), so it says so instead."""
    from craft.engine.plan import describe

    if not torch.cuda.is_available():
        return ("craft plan: skipped, no GPU (the prediction is of GPU memory; `craft plan CONFIG --gpu-memory "
                "24GiB` shows it for a GPU run)")
    gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return "craft plan: " + describe(config, hf_config, world, gpu_memory)


class TrainingRun:
    """One process's share of a run: its stage, its replica's data, the DeepSpeed engine, progress and logs."""

    def __init__(self, config: TrainConfig, rank: int, world: int):
        import deepspeed

        self.config, self.rank, self.world = config, rank, world
        topology = make_topology(config.pipeline_stages, world, config.use_column_major_topology)
        stage_index, self.replica = stage_and_replica(topology, rank)
        self.replicas = world // config.pipeline_stages
        hf_config = read_hf_config(config.model_dir, config.sequence_len)
        train_rows, eval_rows = load_or_build(config, load_tokenizer(config.model_dir), rank, hf_config.vocab_size)
        self.train_batches = MicroBatches(train_rows, config.micro_batch_size, config.gradient_accumulation_steps,
                                          self.replicas, self.replica, config.seed)
        self.eval_batches = MicroBatches(eval_rows, config.micro_batch_size, config.eval_accumulation_steps,
                                         self.replicas, self.replica, config.seed, shuffle=False)
        evals_wanted = (config.evals_per_epoch if config.evals_per_epoch is not None else config.evals_per_run) > 0
        if self.rank == 0 and evals_wanted and len(eval_rows) > 0 and self.eval_batches.steps == 0:
            print(f"craft train: warning: eval is skipped: the {len(eval_rows)} eval sequences fill no eval batch of "
                  f"micro_batch_size x eval_gradient_accumulation_steps x replicas = "
                  f"{config.micro_batch_size * config.eval_accumulation_steps * self.replicas}; raise eval_fraction "
                  f"or lower eval_gradient_accumulation_steps", file=sys.stderr)
        if self.train_batches.steps == 0:
            raise UserError(f"{len(train_rows)} training sequences are too few for one optimizer step of "
                            f"micro_batch_size x gradient_accumulation_steps x replicas = "
                            f"{config.micro_batch_size * config.gradient_accumulation_steps * self.replicas}")
        self.total_steps = min(self.train_batches.steps * config.epochs, config.max_steps or math.inf)
        self.stage = agree_on_errors(lambda: load_stage(config, stage_index, config.pipeline_stages))
        num_adapters = len(config.layer_indices(self.stage.num_layers) or range(self.stage.num_layers))
        self.meter = AuxLossMeter(1.0 / config.gradient_accumulation_steps, num_adapters)
        self.module = build_pipeline_module(self.stage, config.pipeline_stages, topology, self.meter, config.seed,
                                            config.activation_checkpointing, config.chunk_size)
        optimizer = _optimizer([p for p in self.module.parameters() if p.requires_grad], config)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer,
                                                                 config=_deepspeed_config(config))
        self.layout = {"world_size": world, "pipeline_stages": config.pipeline_stages,
                       "column_major": config.use_column_major_topology}
        self.identity = ckpt.run_identity(config, Path(config.model_dir), hf_config.model_type)
        self.progress = Progress()
        self.last_loss = self.last_eval = None

    def start(self, resume: str | None, show_progress: bool) -> None:
        """Choose (or find) the run directory, restore a checkpoint if resuming, open the logs."""
        self.run_dir, resume_from = _run_dir(self.config, resume, self.rank)
        _seed_everything(self.config.seed)  # dropout masks; a resumed run restores the saved generator states
        if resume_from is not None:
            meta = agree_on_errors(lambda: ckpt.load_checkpoint(resume_from, self.rank, self.module, self.optimizer,
                                                                 self.layout))
            self.progress = Progress(**{k: meta[k] for k in ("step", "epoch", "step_in_epoch", "tokens")})
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial_checkpoints(self.run_dir)
            (self.run_dir / "config.json").write_text(self.config.model_dump_json(indent=2))
        barrier()
        self.log = RunLog(self.run_dir, self.rank == 0, self.total_steps, self.progress.step, show_progress,
                          resumed=resume_from is not None)
        # The eval after step k runs before checkpoint k is written, so a run resumed from step k has done it.
        start = self.progress.step + (resume_from is not None)
        schedule = eval_schedule(self.total_steps, self.config.evals_per_run, self.train_batches.steps,
                                 self.config.evals_per_epoch)
        self.evals = {s for s in schedule if s >= start}
        self.output = self.run_dir / f"epoch{max(1, self.progress.epoch)}"  # a resumed, finished run: its last

    def loop(self) -> dict:
        """Train to `total_steps`, evaluating, checkpointing and saving epochs on the way; returns the summary."""
        started = last_checkpoint = time.monotonic()
        progress = self.progress
        self.maybe_evaluate()
        while progress.step < self.total_steps:
            batches = self.train_batches.iterate(progress.epoch, progress.step_in_epoch)
            while progress.step_in_epoch < self.train_batches.steps and progress.step < self.total_steps:
                self.step(batches)
                self.maybe_evaluate()
                epoch_done = progress.step_in_epoch == self.train_batches.steps or progress.step == self.total_steps
                due = time.monotonic() - last_checkpoint >= self.config.checkpoint_interval_hours * 3600
                if epoch_done:
                    self.end_epoch()
                if epoch_done or broadcast_from_zero(due):
                    self.checkpoint()
                    last_checkpoint = time.monotonic()
                if os.environ.get("CRAFT_KILL_AT_STEP") == str(progress.step):
                    os.kill(os.getpid(), signal.SIGKILL)
                if epoch_done:
                    break  # end_epoch() moved the position to the next epoch: it needs a fresh iterator
        self.log.close()
        summary = {"run_dir": str(self.run_dir), "steps": progress.step, "tokens": progress.tokens,
                   "seconds": time.monotonic() - started, "final_train_loss": self.last_loss,
                   "final_eval_loss": self.last_eval, "output": str(self.output), "mode": self.stage.mode,
                   "rank": self.rank}
        barrier()
        return summary

    def maybe_evaluate(self) -> None:
        if self.progress.step in self.evals:
            self.evals.discard(self.progress.step)
            self.last_eval = _evaluate(self.engine, self.eval_batches)
            if self.last_eval is not None:
                self.log.scalars(self.progress.step, {"eval/loss": self.last_eval})

    def step(self, batches) -> None:
        """One optimizer step: accumulation micro-batches through the pipeline, Adam, decoupled regularisation,
        logging."""
        lr = lr_at(self.progress.step, self.total_steps, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tick = time.perf_counter()
        self.last_loss = float(self.engine.train_batch(batches))
        decays = _post_step(self.module, self.config, lr, self.stage.mode)
        norms = _frobenius_norms(_factor_triples(self.module, self.stage.mode))
        parts = all_gather({"norm": norms, "weight_decay": decays, "aux": self.meter.pop()})
        tokens = self.train_batches.tokens_per_step()
        tokens_per_second = tokens / max(1e-9, time.perf_counter() - tick)
        self.progress.step += 1
        self.progress.step_in_epoch += 1
        self.progress.tokens += tokens
        values = {"train/loss": self.last_loss, "train/lr": lr, "train/tokens_per_second": tokens_per_second,
                  **_combine(parts, self.replicas, self.config.gradient_accumulation_steps)}
        self.log.scalars(self.progress.step, values)
        self.log.advance(self.last_loss, tokens_per_second)

    def end_epoch(self) -> None:
        """Save the epoch's adapter / model; a completed epoch moves the data position to the next one."""
        self.output = self.run_dir / f"epoch{self.progress.epoch + 1}"
        save_epoch_output(self.stage, self.output, self.replica)
        if self.progress.step_in_epoch == self.train_batches.steps:
            self.progress.epoch, self.progress.step_in_epoch = self.progress.epoch + 1, 0

    def checkpoint(self) -> None:
        meta = {"step": self.progress.step, "epoch": self.progress.epoch,
                "step_in_epoch": self.progress.step_in_epoch, "tokens": self.progress.tokens, "layout": self.layout,
                "identity": self.identity}
        ckpt.save_checkpoint(self.run_dir, self.progress.step, self.rank, self.module, self.optimizer, meta,
                             self.config.max_checkpoints)
