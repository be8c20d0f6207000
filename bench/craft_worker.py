"""Child process of `bench/craft_vs_original.py`: one CRAFT implementation, timed or probed, in its own venv.

Both implementations are imported as `craft`, so each runs in its own interpreter:

    .venv/bin/python          bench/craft_worker.py time  --impl ours     [options]
    .venv-baseline/bin/python bench/craft_worker.py time  --impl original [options]
    .venv-baseline/bin/python bench/craft_worker.py probe --impl original

This file imports nothing from this repository (the baseline venv cannot import our `craft`): the model is built
here from a `LlamaConfig` with a fixed seed, and the data are seeded random token ids.

`time` trains with the implementation's `CRAFTTrainerMixin` on a plain `transformers.Trainer` (the same host loop
for both; the original's `CRAFTSFTConfig` cannot be built on TRL 1.x, see `probe`). One optimizer step is one
accumulation window of `--accumulation` micro-batches, half SFT (causal-LM loss on `--batch` rows) and half paired
contrastive (InfoNCE between `--batch` anchors and their positives through the projection head), alpha = 0.6.
On CUDA the whole of `train()` runs under bf16 autocast (float32 weights); on CPU in float32.
Step time = the time between consecutive `on_step_end` callbacks (the whole loop: data, forwards, backwards,
optimizer), as wall-clock time and as the process's CPU time; medians over the steps after `--warmup`. On CPU
torch uses `--threads` threads (default 1), so CPU time per step is the work done, which a machine shared with
other jobs changes far less than wall time. Peak memory: on CUDA
`torch.cuda.max_memory_allocated` during `train()`; on CPU the resident-set high-water mark (VmHWM, reset through
`/proc/self/clear_refs` just before `train()`) and its growth over the RSS before `train()`.

`probe` runs each README feature of the original on a tiny model and records ✓ or ✗ with the exception or the
measured reason. It prints one line `WORKER {json}`; so does `time`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

CONTRASTIVE_ROW_KEYS = ("input_ids", "attention_mask", "input_ids_tgt", "attention_mask_tgt", "labels")


# ------------------------------------------------------------------------------------------ model and data


def build_model(hidden: int, layers: int, vocab: int, seq: int, device: str, dtype: torch.dtype):
    """A random-init Llama (`hidden`, `layers`, hidden/64 heads of 64, SwiGLU 8/3·hidden, untied head), seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(seq, 128), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def make_rows(count: int, seq: int, vocab: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`count` SFT rows (input_ids, attention_mask, labels = input_ids) and `count` paired contrastive rows
    (input_ids / attention_mask anchors, input_ids_tgt / attention_mask_tgt positives), all of length `seq`.

    Contrastive rows also carry `labels` of -100 only: transformers 5's Trainer counts label tokens of every
    micro-batch of a window and raises KeyError on a batch without `labels` (the original's contrastive batches
    have none; see the probe). -100 labels count as zero tokens, so neither implementation's SFT weighting moves.
    """
    generator = torch.Generator().manual_seed(seed)

    def ids():
        return torch.randint(4, vocab, (seq,), generator=generator).tolist()

    ones = [1] * seq
    sft = []
    for _ in range(count):
        row = ids()
        sft.append({"input_ids": row, "attention_mask": ones, "labels": list(row)})
    contrastive = [{"input_ids": ids(), "attention_mask": ones, "input_ids_tgt": ids(), "attention_mask_tgt": ones,
                    "labels": [-100] * seq} for _ in range(count)]
    return sft, contrastive


def word_tokenizer(vocab: int):
    """A word-level tokenizer over the words t0 .. t{vocab-1} (ids 0 <pad>, 1 <s>, 2 </s>, 3 <unk>), for hosts
    (TRL's SFTTrainer) that insist on a processing class; the data here is already tokenized."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


# ------------------------------------------------------------------------------- the two implementations


def check_implementation(impl: str):
    """Import `craft` and make sure it is the implementation asked for (the venvs must not be mixed up)."""
    import craft

    location = os.path.dirname(os.path.abspath(craft.__file__))
    if impl == "original":
        from importlib.metadata import version

        if version("contrastive-ft") != "0.4.3" or "site-packages" not in location:
            raise SystemExit(f"expected contrastive-ft 0.4.3 in this venv, found craft at {location}")
    elif not os.path.isfile(os.path.join(location, "engine", "train.py")):
        raise SystemExit(f"expected craft-tune's craft, found craft at {location}")
    return craft


def trainer_classes(impl: str):
    """(TrainingArguments class with the CRAFT knobs, `CRAFTTrainerMixin` on `transformers.Trainer`)."""
    from transformers import Trainer, TrainingArguments

    if impl == "ours":
        from craft.config import CRAFTTrainingArguments as Args
        from craft.trainers import CRAFTTrainerMixin
    else:
        from craft.config import CRAFTConfigMixin
        from craft.trainers import CRAFTTrainerMixin

        @dataclasses.dataclass
        class Args(CRAFTConfigMixin, TrainingArguments):  # the README's CRAFTSFTConfig cannot be built on TRL 1.x
            pass

    class CRAFTTrainer(CRAFTTrainerMixin, Trainer):
        pass

    return Args, CRAFTTrainer


def host_arguments(output_dir: str, batch: int, accumulation: int, max_steps: int, device: str) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                max_steps=max_steps, learning_rate=1e-4, use_cpu=device == "cpu",
                report_to=[], save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
                dataloader_num_workers=0, remove_unused_columns=False)


def build_trainer(impl: str, model, sft, contrastive, args_kwargs: dict, craft_kwargs: dict, callbacks=()):
    """The implementation's CRAFT mixin on `transformers.Trainer`, paired strategy, its own collator."""
    from craft.data import CRAFTCollator, make_craft_datasets

    Args, CRAFTTrainer = trainer_classes(impl)
    args = Args(**args_kwargs, **craft_kwargs)
    bundle = make_craft_datasets(sft, contrastive_dataset=contrastive, strategy="paired_dataset")
    collator = CRAFTCollator() if impl == "original" else CRAFTCollator(pad_token_id=0)
    return CRAFTTrainer(model=model, args=args, train_dataset=sft, craft_bundle=bundle, data_collator=collator,
                        callbacks=list(callbacks))


# ---------------------------------------------------------------------------------------------- timing


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bf16_autocast(device: str):
    """On CUDA, bf16 autocast around the whole of `train()` (float32 master weights).

    Not the Trainer's `bf16=True`: accelerate then autocasts only the wrapped model's forward, and the original
    calls its backbone and projection head outside it (a bf16 model would hand its float32 head bf16 inputs).
    One autocast region covers every forward of both implementations alike.
    """
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear:  # "5" resets VmHWM to the current RSS
            clear.write("5")


def step_end_times():
    """A TrainerCallback recording (wall clock, process CPU time) after a CUDA sync at the end of every step."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, args, state, control, **kwargs):
            _synchronize()
            self.times.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()
            self.times.append((time.perf_counter(), time.process_time()))

    return StepTimes()


def time_training(options) -> dict:
    """Train `warmup + steps` optimizer steps; median step seconds and peak memory during `train()`."""
    check_implementation(options.impl)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and options.threads:
        torch.set_num_threads(options.threads)
    model = build_model(options.hidden, options.layers, options.vocab, options.seq, device, torch.float32)
    rows = options.batch * options.accumulation * (options.warmup + options.steps)
    sft, contrastive = make_rows(rows, options.seq, options.vocab, seed=1)
    timer = step_end_times()
    with tempfile.TemporaryDirectory() as output_dir:
        host = host_arguments(output_dir, options.batch, options.accumulation, options.warmup + options.steps,
                              device)
        trainer = build_trainer(options.impl, model, sft, contrastive, host,
                                dict(craft_alpha=0.6, craft_beta=0.5, craft_temperature=0.05,
                                     craft_projection_dim=256, craft_pooling="last_token"), [timer])
        rss_before_kb = _status_kb("VmRSS")
        _reset_peak_memory()
        with bf16_autocast(device):
            trainer.train()
        _synchronize()
    wall = [b[0] - a[0] for a, b in zip(timer.times, timer.times[1:])][options.warmup:]
    cpu = [b[1] - a[1] for a, b in zip(timer.times, timer.times[1:])][options.warmup:]
    result = {"impl": options.impl, "device": device,
              "dtype": "bfloat16 autocast, float32 weights" if device == "cuda" else "float32",
              "steps_timed": len(wall), "step_seconds": statistics.median(wall), "all_step_seconds": wall,
              "step_cpu_seconds": statistics.median(cpu), "all_step_cpu_seconds": cpu,
              "threads": torch.get_num_threads()}
    if device == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_kb = _status_kb("VmHWM")
        result["peak_memory_mb"] = peak_kb / 1024
        result["memory_growth_mb"] = (peak_kb - rss_before_kb) / 1024
    return result


# ------------------------------------------------------------------------------------ feature probes


def _tiny_setup(count: int = 16, seq: int = 16):
    model = build_model(hidden=64, layers=2, vocab=256, seq=seq, device="cpu", dtype=torch.float32)
    sft, contrastive = make_rows(count, seq, 256, seed=2)
    return model, sft, contrastive


def _tiny_trainer(tmp: str, craft_kwargs: dict | None = None, accumulation: int = 2, steps: int = 2,
                  model=None, contrastive_labels: bool = True):
    tiny_model, sft, contrastive = _tiny_setup()
    if not contrastive_labels:
        contrastive = [{k: v for k, v in row.items() if k != "labels"} for row in contrastive]
    host = host_arguments(tmp, 4, accumulation, steps, "cpu")
    craft_kwargs = {"craft_alpha": 0.6, "craft_beta": 0.5, **(craft_kwargs or {})}
    return build_trainer("original", model or tiny_model, sft, contrastive, host, craft_kwargs)


def probe_readme_config(tmp):
    from craft.config import CRAFTSFTConfig

    CRAFTSFTConfig(output_dir=tmp, craft_alpha=0.6, craft_beta=0.5)
    return "built"


def probe_preset(tmp):
    from craft.config import CRAFTSFTConfig

    CRAFTSFTConfig.from_preset("balanced", output_dir=tmp)
    return "built"


def probe_sft_trainer(tmp):
    """CRAFTSFTTrainer with a config assembled by hand (CRAFTConfigMixin + trl.SFTConfig), 2 steps."""
    from trl import SFTConfig

    from craft.config import CRAFTConfigMixin
    from craft.data import CRAFTCollator, make_craft_datasets
    from craft.trainers import CRAFTSFTTrainer

    @dataclasses.dataclass
    class HandBuiltConfig(CRAFTConfigMixin, SFTConfig):
        pass

    from datasets import Dataset

    model, sft_rows, contrastive_rows = _tiny_setup()
    sft, contrastive = Dataset.from_list(sft_rows), Dataset.from_list(contrastive_rows)
    args = HandBuiltConfig(**host_arguments(tmp, 4, 2, 2, "cpu"), craft_alpha=0.6, craft_beta=0.5)
    trainer = CRAFTSFTTrainer(model=model, args=args, train_dataset=sft, data_collator=CRAFTCollator(),
                              processing_class=word_tokenizer(256),
                              craft_bundle=make_craft_datasets(sft, contrastive, "paired_dataset"))
    trainer.train()
    return "trained 2 steps"


def probe_plain_trainer(tmp):
    """The mixin on transformers.Trainer with contrastive batches as the README describes them (no labels)."""
    _tiny_trainer(tmp, contrastive_labels=False).train()
    return "trained 2 steps"


def probe_ga1_trains_sft(tmp):
    """gradient_accumulation_steps=1, beta=0.5: count SFT batches among the first 8 the mixed loader yields."""
    from torch.utils.data import DataLoader

    from craft.data import CRAFTCollator, CRAFTMixedDataLoader

    _, sft, contrastive = _tiny_setup()
    loader = CRAFTMixedDataLoader(DataLoader(sft, batch_size=2, collate_fn=CRAFTCollator()),
                                  DataLoader(contrastive, batch_size=2, collate_fn=CRAFTCollator()),
                                  beta=0.5, gradient_accumulation_steps=1)
    kinds = [batch["craft_batch_type"] for _, batch in zip(range(8), loader)]
    sft_count = kinds.count("sft")
    if sft_count == 0:
        raise AssertionError(f"0 of {len(kinds)} micro-batches are SFT: the SFT objective is never trained")
    return f"{sft_count} of {len(kinds)} micro-batches are SFT"


def _lm_parameters(model):
    """The language model's own parameters (ours attaches the contrastive objective as `craft_objective`)."""
    return [p for name, p in model.named_parameters() if "craft_objective." not in name]


def alpha_share(impl: str, tmp: str) -> tuple[float, float, float]:
    """Fit one optimizer step's gradient as a·g_sft + b·g_con; returns (a, b, relative residual).

    Setting: alpha=0.6, beta=0.5, 8 micro-batches (4 SFT + 4 paired contrastive), the implementation's mixin on
    transformers.Trainer, no gradient clipping. The 16 SFT rows are copies of one row (batch 2: 8 SFT batches, so
    the original's loader, whose length is the SFT batch count, fills a whole window), and each contrastive
    micro-batch holds all 8 contrastive rows (contrastive batch 8; InfoNCE over a batch does not depend on row
    order), so the references are exact: g_sft = grad of that row's NLL, g_con = grad of the implementation's
    own InfoNCE (its projection head, pooling of the final-norm output) over the 8 pairs. With alpha meaning
    what it says, a / (a + b) = 0.6.
    """
    from transformers import TrainerCallback

    captured = {}

    class CaptureGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            captured["g"] = torch.cat([p.grad.flatten().clone() for p in _lm_parameters(model)]).double()

    model, sft, contrastive = _tiny_setup(count=8)
    sft = [sft[0]] * 16
    host = {**host_arguments(tmp, 2, 8, 1, "cpu"), "max_grad_norm": 0.0}
    trainer = build_trainer(impl, model, sft, contrastive, host,
                            {"craft_alpha": 0.6, "craft_beta": 0.5, "craft_contrastive_batch_size": 8},
                            [CaptureGradient()])
    head = trainer.craft_loss if impl == "original" else trainer.craft_modules  # projection head (+ temperature)
    start = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (model, head)]
    trainer.train()
    for module, state in zip((model, head), start):  # the references are taken at the step's starting point
        module.load_state_dict(state)

    def gradient(loss):
        model.zero_grad(set_to_none=False)
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in _lm_parameters(model)]).double()

    ids = torch.tensor([sft[0]["input_ids"]])
    g_sft = gradient(model(input_ids=ids, labels=ids).loss)
    rows = {k: torch.tensor([row[k] for row in contrastive]) for k in CONTRASTIVE_ROW_KEYS}
    anchors = model.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).last_hidden_state
    positives = model.model(input_ids=rows["input_ids_tgt"],
                            attention_mask=rows["attention_mask_tgt"]).last_hidden_state
    if impl == "original":
        contrastive_loss = trainer.craft_loss(anchors, positives, rows["attention_mask"], rows["attention_mask_tgt"])
    else:
        modules = trainer.craft_modules
        contrastive_loss = modules.infonce(modules.project(modules.pool(anchors, rows["attention_mask"])),
                                           modules.project(modules.pool(positives, rows["attention_mask_tgt"])))
    g_con = gradient(contrastive_loss)
    basis = torch.stack([g_sft, g_con], dim=1)
    a, b = torch.linalg.lstsq(basis, captured["g"][:, None]).solution.flatten().tolist()
    residual = float((basis @ torch.tensor([a, b], dtype=basis.dtype) - captured["g"]).norm() / captured["g"].norm())
    return a, b, residual


def probe_alpha_share(tmp):
    a, b, residual = alpha_share("original", tmp)
    share = a / (a + b)
    measured = f"g = {a:.3f}·g_sft + {b:.3f}·g_con (relative residual {residual:.0e}): SFT share {share:.1%}"
    if abs(share - 0.6) > 0.01 or residual > 1e-3:
        raise AssertionError(measured + ", alpha is 0.6")
    return measured


def probe_hook_rmsnorm(tmp):
    """What the trainer does: LastHiddenStateHook(get_backbone(model)) on a Llama (RMSNorm)."""
    from craft.hooks import LastHiddenStateHook, get_backbone

    model, _, _ = _tiny_setup()
    hook = LastHiddenStateHook(get_backbone(model))
    if not hook.is_attached:
        raise AssertionError("not attached to LlamaRMSNorm: the trainer silently uses output_hidden_states=True")
    return "attached"


def probe_gradcache_gradient(tmp):
    """GradCacheContrastiveLoss as the trainer builds it: does the backbone receive a gradient?"""
    from craft.gradcache import GradCacheConfig, GradCacheContrastiveLoss
    from craft.hooks import get_backbone
    from craft.losses import ProjectionHead, pool_hidden_states

    model, _, contrastive = _tiny_setup()
    batch = {k: torch.tensor([row[k] for row in contrastive[:8]]) for k in CONTRASTIVE_ROW_KEYS}
    backbone = get_backbone(model)
    loss_module = GradCacheContrastiveLoss(backbone=backbone, projector=ProjectionHead(64, output_dim=32),
                                           pooling_fn=lambda h, m: pool_hidden_states(h, m, "last_token"),
                                           config=GradCacheConfig(chunk_size=4))
    loss = loss_module(batch["input_ids"], batch["attention_mask"], batch["input_ids_tgt"],
                       batch["attention_mask_tgt"])
    if loss.requires_grad:
        loss.backward()
    with_grad = [n for n, p in backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    if not with_grad:
        raise AssertionError(f"loss {float(loss):.4f} computed, but no backbone parameter has a gradient")
    return f"{len(with_grad)} backbone tensors have a gradient"


def probe_queue_backward(tmp):
    """craft_negative_strategy='queue' through the trainer, 3 steps (the queue is non-empty from step 2)."""
    _tiny_trainer(tmp, {"craft_negative_strategy": "queue", "craft_negative_queue_size": 64}, steps=3).train()
    return "trained 3 steps"


def probe_projection_trains(tmp):
    """Does the projection head change over 3 optimizer steps (lr 1e-4)?"""
    trainer = _tiny_trainer(tmp, steps=3)
    before = [p.detach().clone() for p in trainer.craft_loss.projector.parameters()]
    trainer.train()
    change = max(float((p.detach() - b).abs().max()) for p, b in zip(trainer.craft_loss.projector.parameters(),
                                                                      before))
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    held = sum(id(p) in in_optimizer for p in trainer.craft_loss.projector.parameters())
    if change == 0.0:
        raise AssertionError(f"max |change| = 0 after 3 steps; {held} of its tensors are in the optimizer")
    return f"max |change| = {change:.2e}"


def probe_gradient_balancing(tmp):
    """craft_gradient_balancing='loss_scale' vs 'none': do the model weights after 2 steps differ?"""
    weights = {}
    for strategy in ("none", "loss_scale"):
        trainer = _tiny_trainer(os.path.join(tmp, strategy), {"craft_gradient_balancing": strategy})
        trainer.train()
        weights[strategy] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    difference = float((weights["none"] - weights["loss_scale"]).abs().max())
    if difference == 0.0:
        raise AssertionError("identical weights: the knob is accepted and ignored")
    return f"max |difference| = {difference:.2e}"


def probe_eval_loss(tmp):
    """trainer.evaluate() on the SFT rows vs the model's own mean causal-LM loss on them."""
    trainer = _tiny_trainer(tmp)
    trainer.train()
    sft = trainer.train_dataset
    reported = trainer.evaluate(eval_dataset=sft)["eval_loss"]
    model = trainer.model.eval()
    with torch.no_grad():
        ids = torch.tensor([row["input_ids"] for row in sft])
        plain = float(model(input_ids=ids, labels=ids).loss)
    if abs(reported - plain) > 1e-3 * max(1.0, abs(plain)):
        raise AssertionError(f"eval_loss {reported:.4f} but the model's loss is {plain:.4f} "
                             f"(ratio {reported / plain:.3f})")
    return f"eval_loss {reported:.4f} = model loss {plain:.4f}"


def _probe_trainer_class(name: str, config_name: str):
    def probe(tmp):
        import craft.config
        import craft.data
        import craft.trainers

        config = getattr(craft.config, config_name)(output_dir=tmp)
        model, sft, contrastive = _tiny_setup()
        getattr(craft.trainers, name)(model=model, args=config, train_dataset=sft,
                                      craft_bundle=craft.data.make_craft_datasets(sft, contrastive,
                                                                                  "paired_dataset"))
        return "constructed"

    probe.__doc__ = f"{name}(args={config_name}(output_dir=...), ...)"
    return probe


PROBES = [
    ("config: CRAFTSFTConfig(output_dir=...) (README quick start)", probe_readme_config),
    ("presets: CRAFTSFTConfig.from_preset('balanced', ...)", probe_preset),
    ("CRAFTSFTTrainer.train() (config assembled by hand from CRAFTConfigMixin + SFTConfig)", probe_sft_trainer),
    ("CRAFTTrainerMixin on transformers.Trainer, paired batches as documented", probe_plain_trainer),
    ("alpha=0.6 is the SFT share of the gradient (beta=0.5, 8 micro-batches, transformers.Trainer)",
     probe_alpha_share),
    ("gradient_accumulation_steps=1 with beta=0.5 trains SFT", probe_ga1_trains_sft),
    ("hidden-state hook attaches to RMSNorm (Llama)", probe_hook_rmsnorm),
    ("GradCache gives the model a gradient", probe_gradcache_gradient),
    ("negative queue (MoCo) survives backward", probe_queue_backward),
    ("projection head trains", probe_projection_trains),
    ("craft_gradient_balancing changes training", probe_gradient_balancing),
    ("eval loss is the model's SFT loss", probe_eval_loss),
    ("CRAFTDPOTrainer", _probe_trainer_class("CRAFTDPOTrainer", "CRAFTDPOConfig")),
    ("CRAFTGRPOTrainer", _probe_trainer_class("CRAFTGRPOTrainer", "CRAFTGRPOConfig")),
    ("CRAFTORPOTrainer", _probe_trainer_class("CRAFTORPOTrainer", "CRAFTORPOConfig")),
    ("CRAFTPPOTrainer", _probe_trainer_class("CRAFTPPOTrainer", "CRAFTPPOConfig")),
]


def run_probes(options) -> dict:
    """Each probe in its own temporary directory; a probe passes when it returns, fails when it raises."""
    check_implementation(options.impl)
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    results = []
    for name, probe in PROBES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                note = probe(tmp)
                results.append({"feature": name, "ok": True, "note": note})
            except Exception as error:  # the exception is the finding
                frame = traceback.extract_tb(error.__traceback__)[-1]
                where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
                message = " ".join(str(error).split())[:240]
                results.append({"feature": name, "ok": False, "note": f"{type(error).__name__}: {message} "
                                                                       f"[{where}]"})
    return {"impl": options.impl, "probes": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("time", "probe"))
    parser.add_argument("--impl", choices=("ours", "original"), required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    options = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    result = time_training(options) if options.mode == "time" else run_probes(options)
    print("WORKER " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
