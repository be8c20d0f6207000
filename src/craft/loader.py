"""The SFT / contrastive micro-batch scheduler and the loaders it draws from.

* `CRAFTMixedDataLoader` interleaves micro-batches of an SFT loader and a contrastive loader: global micro-batch
  ``k`` (0-based, counted from the start of the pass) is contrastive iff ``floor((k+1)·γ) > floor(k·γ)`` with
  ``γ = 1 - β`` (β = ``craft_beta``, the SFT share), so exactly a γ fraction of any prefix is contrastive, spread
  evenly.
* `ContrastiveStream` is an endless, seekable stream of a loader's batches (the wrappers' contrastive side).
* `build_loader` makes the seeded, resumable DataLoaders both use.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Iterator

import torch
from torch import Tensor

from craft.accumulator import BATCH_TYPE_KEY, CONTRASTIVE, SFT
from craft.errors import UserError

LENGTH_STRATEGIES = ("oversample", "cap", "auto_beta", "error")
BETA_MODES = ("fixed", "auto")


def _as_fraction(beta: Any) -> Fraction:
    if isinstance(beta, Fraction):
        value = beta
    else:
        try:
            value = Fraction(str(float(beta)))  # exact decimal: 0.29 -> 29/100, no float floor surprises
        except (TypeError, ValueError):
            raise UserError(f"craft_beta must be a number in [0, 1]; got {beta!r}") from None
    if not 0 <= value <= 1:
        raise UserError(f"craft_beta must be in [0, 1]; got {float(value)}")
    return value


def is_contrastive_step(k: int, beta: float | Fraction) -> bool:
    """Whether global micro-batch ``k`` (0-based) is contrastive for the SFT fraction ``beta``:
    ``floor((k+1)·γ) > floor(k·γ)`` with ``γ = 1 - beta``."""
    frac = 1 - _as_fraction(beta)
    p, q = frac.numerator, frac.denominator
    return ((k + 1) * p) // q > (k * p) // q


def contrastive_count(k: int, beta: float | Fraction) -> int:
    """How many of micro-batches ``0..k-1`` are contrastive: ``floor(k·γ)`` with ``γ = 1 - beta`` (the schedule's
    prefix property)."""
    frac = 1 - _as_fraction(beta)
    return (int(k) * frac.numerator) // frac.denominator


def _loader_len(loader: Any, name: str) -> int:
    try:
        return len(loader)
    except TypeError:
        raise UserError(f"the {name} loader has no length (an iterable dataset?); CRAFTMixedDataLoader needs "
                        "loaders whose len() is the number of batches per pass") from None


def _batch_count(loader: Any, given: int | None, name: str) -> int:
    """Batches per pass of ``loader``: ``given`` when set, else ``len(loader)`` (0 without a loader)."""
    if given is not None:
        if int(given) < 0:
            raise UserError(f"total {name} batches must be >= 0; got {given}")
        return int(given)
    return 0 if loader is None else _loader_len(loader, name)


class CRAFTMixedDataLoader:
    """Interleave SFT and contrastive micro-batches; each yielded batch is a dict with the extra key
    ``"craft_batch_type"`` (``"sft"`` or ``"craft"``, contrastive-ft's tag for contrastive batches).

    ``beta`` is the fraction of micro-batches drawn from the SFT loader (contrastive-ft 0.4.3's meaning; default
    0.6); ``γ = 1 - beta`` is the contrastive fraction. Micro-batch ``k`` of a pass is contrastive iff
    ``floor((k+1)·γ) > floor(k·γ)``: any prefix of ``K`` batches holds ``floor(K·γ)`` contrastive ones, spread
    evenly, across accumulation windows too. beta = 1 gives only SFT, beta = 0 only contrastive; with
    0 < beta < 1 and one micro-batch per step the two objectives alternate. Without a contrastive loader every
    micro-batch is SFT.

    ``length_strategy``:
      * ``oversample`` (default) — restart the loader that runs out until both have been fully consumed at least
        once; no SFT batch is skipped.
      * ``cap`` — stop at the first batch whose loader would need a restart.
      * ``auto_beta`` — beta = n_sft / (n_sft + n_con) from the loaders' lengths, then cap: both end together.
      * ``error`` — a `UserError` when cap and oversample would give different passes.
    ``beta_mode="auto"`` takes beta = n_sft / (n_sft + n_con) as ``auto_beta`` does, with the length strategy
    given. ``total_sft_batches`` / ``total_craft_batches`` (contrastive-ft's names) give the loaders' batch counts
    per pass when they differ from ``len()`` or the loaders have none. ``beta`` holds the beta in use. ``len()``
    is exactly the number of micro-batches one pass yields; ``schedule()`` lists their types. The SFT loader may
    be None only if beta = 0.
    """

    def __init__(self, sft_loader: Any, contrastive_loader: Any = None, *, beta: float = 0.6,
                 gradient_accumulation_steps: int = 1, beta_mode: str = "fixed", length_strategy: str = "oversample",
                 total_sft_batches: int | None = None, total_craft_batches: int | None = None):
        if length_strategy not in LENGTH_STRATEGIES:
            raise UserError(f"unknown craft_length_strategy {length_strategy!r}; valid: {', '.join(LENGTH_STRATEGIES)}")
        if beta_mode not in BETA_MODES:
            raise UserError(f"unknown craft_beta_mode {beta_mode!r}; valid: {', '.join(BETA_MODES)}")
        if int(gradient_accumulation_steps) < 1:
            raise UserError(f"gradient_accumulation_steps must be >= 1; got {gradient_accumulation_steps}")
        self.sft_loader = sft_loader
        self.contrastive_loader = contrastive_loader
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.length_strategy = length_strategy
        self.beta_mode = beta_mode
        self.epoch = 0
        self.num_sft_batches = _batch_count(sft_loader, total_sft_batches, "SFT")
        self.num_contrastive_batches = _batch_count(contrastive_loader, total_craft_batches, "contrastive")
        n_sft, n_con = self.num_sft_batches, self.num_contrastive_batches

        if contrastive_loader is None:
            self._beta = Fraction(0)  # nothing to mix in: SFT only
        elif beta_mode == "auto" or length_strategy == "auto_beta":
            if n_sft + n_con == 0 or sft_loader is None:
                raise UserError("an automatic beta (craft_beta_mode='auto' or craft_length_strategy='auto_beta') "
                                "needs both an SFT and a contrastive loader with batches")
            self._beta = Fraction(n_con, n_con + n_sft)
        else:
            self._beta = 1 - _as_fraction(beta)
        # `_beta` is the contrastive fraction γ of the schedule; `beta` the SFT fraction users set.
        self.beta = float(1 - self._beta)
        if self._beta > 0 and n_con == 0:
            raise UserError(f"craft_beta={self.beta:g} schedules contrastive micro-batches but the contrastive "
                            "loader is empty")
        if self._beta < 1 and n_sft == 0:
            raise UserError(f"craft_beta={self.beta:g} schedules SFT micro-batches but the SFT loader is missing or "
                            "empty")

        if length_strategy == "error":
            capped, oversampled = self._plan("cap"), self._plan("oversample")
            if len(capped) != len(oversampled):
                raise UserError(
                    f"craft_length_strategy='error': the loaders do not match the beta schedule ({n_sft} SFT and "
                    f"{n_con} contrastive batches at craft_beta={self.beta:g}: a capped pass has {len(capped)} "
                    f"micro-batches, an oversampled one {len(oversampled)}); matching lengths need beta = "
                    f"{n_sft}/{n_con + n_sft}, or use 'oversample', 'cap' or 'auto_beta'")
            self._schedule = oversampled
        else:
            self._schedule = self._plan("cap" if length_strategy in ("cap", "auto_beta") else "oversample")

    def _plan(self, rule: str) -> list[str]:
        p, q = self._beta.numerator, self._beta.denominator
        need = {SFT: self.num_sft_batches if p < q else 0, CONTRASTIVE: self.num_contrastive_batches if p > 0 else 0}
        available = {SFT: self.num_sft_batches, CONTRASTIVE: self.num_contrastive_batches}
        used = {SFT: 0, CONTRASTIVE: 0}
        plan: list[str] = []
        k = 0
        while True:
            if rule == "oversample" and used[SFT] >= need[SFT] and used[CONTRASTIVE] >= need[CONTRASTIVE]:
                return plan
            kind = CONTRASTIVE if ((k + 1) * p) // q > (k * p) // q else SFT
            if rule == "cap" and used[kind] >= available[kind]:
                return plan
            plan.append(kind)
            used[kind] += 1
            k += 1

    def schedule(self) -> list[str]:
        """The batch types (``"sft"`` / ``"craft"``) of one pass, in order."""
        return list(self._schedule)

    def windows(self) -> list[tuple[int, int]]:
        """``(num_sft, num_contrastive)`` for each accumulation window of one pass (the last may be partial)."""
        ga = self.gradient_accumulation_steps
        out = []
        for start in range(0, len(self._schedule), ga):
            chunk = self._schedule[start:start + ga]
            n_con = chunk.count(CONTRASTIVE)
            out.append((len(chunk) - n_con, n_con))
        return out

    def __len__(self) -> int:
        return len(self._schedule)

    @property
    def batch_size(self) -> int | None:
        loader = self.sft_loader if self.sft_loader is not None else self.contrastive_loader
        return getattr(loader, "batch_size", None)

    def passes_per_epoch(self) -> dict[str, int]:
        """How many passes one epoch takes of each loader (the schedule fixes it): ``{"sft": P, "craft": P}``."""
        sizes = {SFT: self.num_sft_batches, CONTRASTIVE: self.num_contrastive_batches}
        return {kind: -(-self._schedule.count(kind) // sizes[kind]) if sizes[kind] else 0 for kind in sizes}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``__iter__`` yields: loader pass ``r`` of epoch ``e`` is shuffled as pass
        ``e · P + r`` (``P`` = `passes_per_epoch`), forwarded to the loaders' samplers that have ``set_epoch``.

        Why passes are numbered: a shuffling `DataLoader` draws each pass's order from a generator whose state
        advances with every pass, so a run resumed in epoch 3 (fresh generator) would replay epoch 1's order."""
        self.epoch = int(epoch)
        passes = self.passes_per_epoch()
        for kind, loader in ((SFT, self.sft_loader), (CONTRASTIVE, self.contrastive_loader)):
            if loader is not None:
                set_loader_epoch(loader, self.epoch * passes[kind])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loaders = {SFT: self.sft_loader, CONTRASTIVE: self.contrastive_loader}
        passes = self.passes_per_epoch()
        started = {SFT: 0, CONTRASTIVE: 0}
        iterators: dict[str, Iterator | None] = {SFT: None, CONTRASTIVE: None}

        def start(kind: str) -> Iterator:
            set_loader_epoch(loaders[kind], self.epoch * passes[kind] + started[kind])
            started[kind] += 1
            return iter(loaders[kind])

        for kind in self._schedule:
            if iterators[kind] is None:
                iterators[kind] = start(kind)
            try:
                batch = next(iterators[kind])
            except StopIteration:
                iterators[kind] = start(kind)  # oversampling: the next pass of this loader
                try:
                    batch = next(iterators[kind])
                except StopIteration:
                    raise RuntimeError(f"the {kind} loader yielded no batch after a restart") from None
            if not isinstance(batch, Mapping):
                raise UserError(f"CRAFTMixedDataLoader needs loaders that yield dicts; the {kind} loader yielded "
                                f"a {type(batch).__name__}")
            batch = dict(batch)
            batch[BATCH_TYPE_KEY] = kind
            if kind == CONTRASTIVE and "labels" not in batch and isinstance(batch.get("input_ids"), Tensor):
                # No SFT target in a contrastive micro-batch; transformers' Trainer counts `labels` in every
                # micro-batch of a window once the first has them, so they are stated: all -100.
                batch["labels"] = torch.full_like(batch["input_ids"], -100)
            yield batch


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Forward ``epoch`` to the first of ``loader``, its sampler, its batch sampler and the batch sampler's sampler
    that has ``set_epoch`` (a `DistributedSampler`, accelerate's loaders); loaders without one are left alone."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for target in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        if target is not None and callable(getattr(target, "set_epoch", None)):
            target.set_epoch(int(epoch))
            return


class ContrastiveStream:
    """An endless stream of a loader's batches, pass after pass, whose position is the number of batches drawn.

    Pass ``p`` is shuffled as sampler epoch ``p`` (`set_loader_epoch`), so `seek(n)` puts a fresh stream exactly
    where one that had drawn ``n`` batches stands: pass ``n // len(loader)``, after ``n % len(loader)`` batches.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self.length = _loader_len(loader, "contrastive")
        if self.length == 0:
            raise UserError("the contrastive loader is empty: it yields no batch")
        self.position = 0
        self._iterator: Iterator | None = None

    def seek(self, position: int) -> None:
        """Continue as a stream that has already yielded ``position`` batches."""
        self.position = int(position)
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        offset = self.position % self.length
        if self._iterator is None or offset == 0:
            set_loader_epoch(self.loader, self.position // self.length)
            self._iterator = iter(self.loader)
            for _ in range(offset):  # resumed mid-pass: skip what the interrupted run drew
                next(self._iterator)
        batch = next(self._iterator)
        self.position += 1
        return batch


def build_loader(dataset: Any, batch_size: int, collator: Any, shuffle: bool, seed: int, drop_last: bool = False, *,
                 num_replicas: int | None = None, rank: int | None = None, num_workers: int = 0):
    """A `torch.utils.data.DataLoader` over `dataset` (a datasets.Dataset or a list of dicts).

    Shuffling is seeded: pass ``p`` (the sampler's ``set_epoch(p)``) is the permutation of (``seed``, ``p``), the
    same in any run; iterating never touches the global torch RNG. With ``num_replicas > 1`` the data is sharded
    by the same `DistributedSampler` (``rank`` of ``num_replicas``). Without shuffling and sharding the loader reads
    the rows in order.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if int(batch_size) < 1:
        raise UserError(f"batch size must be >= 1; got {batch_size}")
    replicas = 1 if num_replicas is None else max(int(num_replicas), 1)
    # Its own generator: a DataLoader without one draws a seed from the global torch RNG at every iter(), which
    # would shift the dropout randomness of a resumed run (its loaders restart at other moments).
    generator = torch.Generator().manual_seed(int(seed))
    if replicas == 1 and not shuffle:
        return DataLoader(dataset, batch_size=int(batch_size), shuffle=False, collate_fn=collator,
                          drop_last=drop_last, num_workers=num_workers, generator=generator)
    # One replica too: DistributedSampler's order is a function of (seed, epoch) alone, which resume needs.
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank or 0, shuffle=shuffle, seed=int(seed),
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, collate_fn=collator, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)
