"""The CRAFT trainers' train loader: SFT and contrastive micro-batches interleaved by `craft.loader`.

`CRAFTLoadersMixin` builds the SFT loader (the host's collator, padding-free when TRL packs) and the contrastive
loader (`CRAFTCollator`, the dataset's own column names renamed), both seeded and sharded per rank, and hands the
Trainer their `CRAFTMixedDataLoader` as its train loader. `EpochSync` keeps the mixed loader's epoch right after a
resume, so a resumed epoch is shuffled as the interrupted one was.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import TrainerCallback

from craft.collator import CRAFTCollator
from craft.hooks import text_config
from craft.loader import CRAFTMixedDataLoader, build_loader
from craft.trainer_keys import RenamedRows


class _MixedBatches(IterableDataset):
    """The mixed loader as an iterable dataset, so the Trainer's `len()`, resume skipping and epochs work."""

    def __init__(self, mixed: CRAFTMixedDataLoader):
        self.mixed = mixed

    def __iter__(self):
        return iter(self.mixed)

    def __len__(self):
        return len(self.mixed)


class _MixedBatchLoader(DataLoader):
    """The Trainer's train loader: yields the mixed loader's micro-batches as they are; `set_epoch` reaches
    the per-rank samplers (a fresh shard order each epoch)."""

    def __init__(self, mixed: CRAFTMixedDataLoader):
        # Its own generator: iter() must not draw from the global RNG (resumed dropout randomness would shift).
        super().__init__(_MixedBatches(mixed), batch_size=None, generator=torch.Generator())

    def set_epoch(self, epoch: int) -> None:
        self.dataset.mixed.set_epoch(epoch)


class EpochSync(TrainerCallback):
    """Tells the mixed loader its epoch at every epoch start. The Trainer's own `set_epoch` does not reach it in
    the epoch a run resumes inside (accelerate's batch-skipping wrapper drops the call), and a resumed epoch must be
    shuffled as the interrupted one was. Epoch = global_step // optimizer steps per epoch, the Trainer's rule."""

    def __init__(self, trainer: "CRAFTLoadersMixin"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        mixed = self.trainer.craft_mixed_loader
        if mixed is not None:
            steps_per_epoch = max(-(-len(mixed) // args.gradient_accumulation_steps), 1)
            mixed.set_epoch(state.global_step // steps_per_epoch)


class CRAFTLoadersMixin:
    """The train loader of a CRAFT trainer (mixed into `craft.trainers.CRAFTTrainerMixin`)."""

    def _craft_packs(self) -> bool:
        """Whether the host packs SFT rows padding-free (TRL's `packing=True` / `padding_free=True`)."""
        return bool(getattr(self, "padding_free", False))

    def _craft_collator(self, packed: bool = False):
        """The user's collator, or `CRAFTCollator`; a `CRAFTCollator` packs padding-free iff ``packed`` (the SFT
        loader of a host that packs: the batches TRL itself would build)."""
        collator = self._craft_user_collator
        if collator is None:
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            pad_id = getattr(tokenizer, "pad_token_id", None)
            if pad_id is None:
                pad_id = getattr(text_config(self.model), "pad_token_id", None) or 0
            collator = CRAFTCollator(pad_token_id=pad_id, assistant_mask_key=self.args.craft_assistant_mask_key,
                                     add_labels=True)
        if isinstance(collator, CRAFTCollator) and collator.padding_free != packed:
            collator = copy.copy(collator)
            collator.padding_free = packed
        return collator

    def _craft_build_loader(self, dataset, batch_size: int, contrastive: bool = False) -> DataLoader:
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        packed = not contrastive and self._craft_packs()
        collator = (self._craft_contrastive_collator if contrastive else None) or self._craft_collator(packed)
        if contrastive and self._craft_custom_keys:  # renamed before padding: the collator pads token columns
            collator = RenamedRows(collator, self._craft_custom_keys)
        return build_loader(dataset, batch_size, collator, shuffle=True, seed=seed,
                            drop_last=args.dataloader_drop_last, num_replicas=args.world_size,
                            rank=args.process_index)

    def build_craft_mixed_loader(self) -> CRAFTMixedDataLoader:
        """The mixed SFT / contrastive micro-batch loader of one epoch (custom loaders take precedence).

        Self-align without a separate contrastive dataset or loader yields SFT micro-batches only (beta = 1):
        every one of them gives both losses from its single forward.
        """
        args = self.args
        if self._craft_loader_factory is not None:
            self._craft_sft_loader, self._craft_contrastive_loader = self._craft_factory_loaders()
        sft_loader = self._craft_sft_loader or self._craft_build_loader(self.train_dataset,
                                                                         args.per_device_train_batch_size)
        bundle = self.craft_bundle
        if (self.craft_self_align and self._craft_contrastive_loader is None
                and bundle.contrastive_dataset is bundle.sft_dataset):
            return CRAFTMixedDataLoader(sft_loader, None, beta=1.0,
                                        gradient_accumulation_steps=args.gradient_accumulation_steps)
        contrastive_loader = self._craft_contrastive_loader or self._craft_build_loader(
            bundle.contrastive_dataset, args.craft_contrastive_batch_size or args.per_device_train_batch_size,
            contrastive=True)
        return CRAFTMixedDataLoader(sft_loader, contrastive_loader, beta=args.craft_beta,
                                    gradient_accumulation_steps=args.gradient_accumulation_steps,
                                    length_strategy=args.craft_length_strategy, beta_mode=args.craft_beta_mode)

    def get_train_dataloader(self) -> DataLoader:
        self.craft_mixed_loader = self.build_craft_mixed_loader()
        return _MixedBatchLoader(self.craft_mixed_loader)
