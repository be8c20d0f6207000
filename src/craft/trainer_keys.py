"""contrastive-ft 0.4.3's trainer arguments and batch keys in a CRAFT trainer.

* Without ``craft_bundle``, ``contrastive_dataset`` / ``craft_strategy`` build it from the trainer's
  ``train_dataset`` (`make_craft_datasets`; paired with a contrastive dataset, else self-align);
  ``craft_loader_factory(trainer)`` returns ``(sft_loader, contrastive_loader or None)``.

* ``craft_contrastive_keys`` maps the canonical contrastive columns (``anchor_input_ids`` -> ``input_ids``, ...,
  `craft.data.CONTRASTIVE_KEYS`) to the dataset's own names. Rows of the contrastive dataset are renamed before
  collation (`RenamedRows`, so the collator pads them as token columns), batches of a user-given contrastive
  loader when the trainer fetches them; the bundle is checked against the keys when the trainer is built.
* ``craft_assistant_mask_strategy`` selects how self-align finds the assistant span
  (`craft.data.assistant_token_mask`); ``"none"`` leaves self-align without one, which is an error here.
"""

from __future__ import annotations

from craft.accumulator import CONTRASTIVE, batch_type
from craft.data import CONTRASTIVE_KEYS, canonical_columns, make_craft_datasets
from craft.errors import UserError


class RenamedRows:
    """A collator applied to rows whose craft_contrastive_keys columns are renamed to the canonical names."""

    def __init__(self, collator, keys: dict[str, str]):
        self.collator, self.keys = collator, keys

    def __call__(self, rows):
        return self.collator([canonical_columns(row, self.keys) for row in rows])


class CRAFTBatchKeysMixin:
    """The contrastive-ft-argument half of `craft.trainers.CRAFTTrainerMixin` (expects ``args``,
    ``train_dataset``, ``craft_bundle``, ``craft_self_align`` on the trainer)."""

    def _craft_resolve_bundle(self, bundle, contrastive_dataset, strategy):
        """``bundle``, or the one contrastive-ft 0.4.3 built from ``train_dataset`` and these two arguments."""
        if bundle is not None:
            if contrastive_dataset is not None or strategy is not None:
                raise UserError("pass either craft_bundle or contrastive_dataset / craft_strategy, not both")
            return bundle
        if self.train_dataset is None:
            raise UserError(f"{type(self).__name__} needs craft_bundle=make_craft_datasets(...) or a train_dataset")
        strategy = strategy or ("paired_dataset" if contrastive_dataset is not None else "self_align")
        return make_craft_datasets(self.train_dataset, contrastive_dataset, strategy,
                                   assistant_mask_key=self.args.craft_assistant_mask_key,
                                   contrastive_keys=self._craft_custom_keys)

    def _craft_factory_loaders(self):
        """``craft_loader_factory(trainer)``, checked: ``(sft_loader, contrastive_loader or None)``."""
        produced = self._craft_loader_factory(self)
        if not isinstance(produced, tuple) or len(produced) != 2 or produced[0] is None:
            raise UserError("craft_loader_factory must return (sft_loader, contrastive_loader or None); got "
                            f"{type(produced).__name__}")
        return produced

    @property
    def _craft_custom_keys(self) -> dict[str, str] | None:
        """``craft_contrastive_keys`` when it names other columns than the canonical ones, else None."""
        keys = self.args.craft_contrastive_keys
        return None if keys == CONTRASTIVE_KEYS else keys

    def _craft_check_compat_keys(self) -> None:
        """Errors for craft_assistant_mask_strategy / craft_contrastive_keys that cannot work with the bundle."""
        if self.craft_self_align and self.args.craft_assistant_mask_strategy == "none":
            raise UserError("craft_assistant_mask_strategy='none' leaves self_align without an assistant span to "
                            "take positives from; use 'auto' or 'provided', or strategy='paired_dataset'")
        bundle = self.craft_bundle
        if self._craft_custom_keys and not self.craft_self_align:
            make_craft_datasets(bundle.sft_dataset, bundle.contrastive_dataset, "paired_dataset",
                                contrastive_keys=self._craft_custom_keys)

    def _craft_canonical(self, batch):
        """A contrastive micro-batch with its craft_contrastive_keys columns under the canonical names."""
        keys = self._craft_custom_keys
        return canonical_columns(batch, keys) if keys and batch_type(batch) == CONTRASTIVE else batch
