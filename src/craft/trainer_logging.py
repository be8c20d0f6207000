"""What a CRAFT trainer logs: the optimised objective's terms per accumulation window, and the contrastive metrics.

Per optimizer step (one window of micro-batches on this rank): ``loss/craft_sft`` = the window's SFT token NLL
sum / its SFT tokens, ``loss/craft_contrast`` = the mean InfoNCE of its contrastive terms, ``loss/craft_total`` =
``alpha · sft + (1 - alpha) · contrast`` (terms that are absent count 0), the effective task weights
``balancing/craft_weight_*``, and (``craft_report_metrics``) ``metrics/craft_contrastive_accuracy``,
``metrics/craft_representation_consistency``, ``metrics/craft_temperature``. Values are averaged over the
Trainer's logging interval. ``craft/tokens_per_second`` is this rank's throughput over the interval: the tokens it
fed the model (`batch_tokens`) per wall second (not logged for hosts whose batches are raw prompts: GRPO, RLOO).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from time import perf_counter

import torch

from craft.accumulator import WindowCounts
from craft.balancing_step import CONTRASTIVE_TASK, SFT_TASK
from craft.metrics import contrastive_accuracy

logger = logging.getLogger("craft.trainers")


_NOT_TOKENS = ("position_ids", "token_type_ids")


def batch_tokens(batch) -> int | torch.Tensor | None:
    """Tokens a micro-batch feeds the model, over every token column: ``*input_ids`` (anchors, ``*_tgt``
    positives, DPO's chosen / rejected) and ``*_ids`` (GRPO's prompt / completion), each counted by the ones of its
    mask (``attention_mask`` twin, ``*_mask``), or by its size where it has none (a packed batch). None for a batch
    that is not a dict of columns (GRPO / RLOO get raw prompts, tokenised later by generation)."""
    if not isinstance(batch, Mapping):
        return None
    total = 0
    for key, ids in batch.items():
        base = key.removesuffix("_tgt")
        if base in _NOT_TOKENS or not base.endswith("_ids") or not isinstance(ids, torch.Tensor):
            continue
        twin = key.replace("input_ids", "attention_mask") if "input_ids" in key else base[:-len("_ids")] + "_mask"
        mask = batch.get(twin)
        # A mask's sum stays a tensor: reading it here would wait for the GPU at every micro-batch (read at log time).
        total = total + (mask.sum() if isinstance(mask, torch.Tensor) else ids.numel())
    return total


class WindowLog:
    """Running sums of one accumulation window (this rank), turned into the logged loss terms when it ends."""

    def __init__(self, counts: WindowCounts, num_micro_batches: int):
        self.counts = counts
        self.remaining = num_micro_batches
        self.sft_nll_sum = 0.0
        self.contrastive_sum = 0.0


class CRAFTLoggingMixin:
    """The logging half of `craft.trainers.CRAFTTrainerMixin` (expects ``_craft_window``, ``_craft_logs``,
    ``craft_objective``, ``craft_balancing`` on the trainer)."""

    def _craft_record_contrastive(self, loss, logits, anchors) -> None:
        self._craft_window.contrastive_sum += float(loss.detach())
        args = self.args
        if args.craft_metric_enabled("contrastive_accuracy"):
            self._craft_logs["metrics/craft_contrastive_accuracy"].append(contrastive_accuracy(logits))
        if args.craft_metric_enabled("representation_consistency"):
            ema = self.craft_objective.ema
            self._craft_logs["metrics/craft_representation_consistency"].append(ema.representation_consistency(anchors))
            ema.update(anchors)
        if args.craft_learnable_temperature and args.craft_metric_enabled("temperature"):
            self._craft_logs["metrics/craft_temperature"].append(1.0 / float(self.craft_objective.infonce.last_logit_scale))

    def _craft_end_micro_batch(self) -> None:
        window = self._craft_window
        window.remaining -= 1
        if window.remaining > 0:
            return
        alpha, total = self.args.craft_alpha, 0.0
        if window.counts.sft_tokens:
            sft = window.sft_nll_sum / window.counts.sft_tokens
            self._craft_logs["loss/craft_sft"].append(sft)
            total += alpha * sft
        if window.counts.contrastive_terms:
            contrast = window.contrastive_sum / window.counts.contrastive_terms
            self._craft_logs["loss/craft_contrast"].append(contrast)
            total += (1 - alpha) * contrast
        self._craft_logs["loss/craft_total"].append(total)
        self._craft_end_step_balancing(window)
        if self.args.craft_debug:
            memory = (f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.3f} GiB"
                      if torch.cuda.is_available() and torch.cuda.is_initialized() else "")
            logger.info("CRAFT debug step %d: %s%s", self.state.global_step,
                        ", ".join(f"{name}={values[-1]:.6g}" for name, values in self._craft_logs.items()
                                  if name.startswith(("loss/", "balancing/"))), memory)

    def _craft_debug_window(self, what: str) -> None:
        """craft_debug: the window's counts and loss weights, when it opens."""
        scaler = self._craft_scaler
        logger.info("CRAFT debug step %d: %s; N_sft=%d tokens, M_con=%d InfoNCE terms (all ranks); weight %.6g per "
                    "SFT token, %.6g per InfoNCE term", self.state.global_step, what, scaler.counts.sft_tokens,
                    scaler.counts.contrastive_terms, scaler.sft_token_weight, scaler.contrastive_term_weight)

    def _craft_end_step_balancing(self, window: WindowLog) -> None:
        """Log the step's effective weights (alpha-weight x balancing weight); loss_scale and gradnorm get the
        step's task losses averaged over ranks."""
        balancing = self.craft_balancing
        for task, weight in balancing.effective_weights().items():
            self._craft_logs[f"balancing/craft_weight_{task}"].append(weight)
        if balancing.strategy not in ("loss_scale", "gradnorm"):
            return
        sums = torch.tensor([window.sft_nll_sum, window.counts.sft_tokens, window.contrastive_sum,
                             window.counts.contrastive_terms], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(sums)
        sums = sums.tolist()
        self._craft_step_losses = {task: sums[2 * task] / sums[2 * task + 1]
                                   for task in (SFT_TASK, CONTRASTIVE_TASK) if sums[2 * task + 1] > 0}
        balancing.end_step(self._craft_step_losses)

    @property
    def craft_metrics(self) -> dict[str, float]:
        """The latest CRAFT terms and metrics, as the trainer logs them (``loss/craft_sft``, ``loss/craft_contrast``,
        ``loss/craft_total``, ``metrics/craft_*``, ``balancing/*``): the averages of the last logging interval,
        updated by the steps taken since (so after `train()` they cover its last steps)."""
        latest = getattr(self, "_craft_latest_logs", {})
        pending = {name: sum(values) / len(values) for name, values in self._craft_logs.items() if values}
        return {**latest, **pending}

    def _craft_count_tokens(self, batch) -> None:
        """Add a micro-batch's tokens to this logging interval's count (the clock starts at the first one)."""
        if getattr(self, "_craft_interval_start", None) is None:
            self._craft_interval_start, self._craft_interval_tokens = perf_counter(), 0
        tokens = batch_tokens(batch)
        # An uncountable batch makes the interval's rate unknown: it is not logged rather than undercounted.
        self._craft_interval_tokens = None if tokens is None or self._craft_interval_tokens is None else (
            self._craft_interval_tokens + tokens)

    def log(self, logs, start_time=None):
        """Trainer logs plus the CRAFT terms averaged over the logging interval and this rank's tokens per second
        (training logs only)."""
        if "loss" in logs and self._craft_logs:
            self._craft_latest_logs = {name: sum(values) / len(values) for name, values in self._craft_logs.items()}
            logs.update(self._craft_latest_logs)
            self._craft_logs.clear()
        start = getattr(self, "_craft_interval_start", None)
        if "loss" in logs and start is not None:
            if self._craft_interval_tokens is not None:
                seconds = max(perf_counter() - start, 1e-9)
                logs["craft/tokens_per_second"] = float(self._craft_interval_tokens) / seconds
            self._craft_interval_start = None
        return super().log(logs, start_time)
