"""The contrastive micro-batch of a CRAFT trainer: forward, pooling, and the objective's InfoNCE.

`CRAFTContrastiveMixin` turns a contrastive micro-batch (paired anchors / positives, or a self-align batch whose
prompt and assistant spans are the two views) into the last hidden states [B, T, H], pools them and scores them
with the model's `ContrastiveObjective` (`craft.objective`); with `craft_use_gradcache` the micro-batch goes
through `craft.gradcache.contrastive_gradcache` in chunks. Subclasses change the contrastive computation by
overriding `_contrastive_loss(model, batch)`.
"""

from __future__ import annotations

import torch

from craft.encoding import (forward_hidden, ids_and_mask, packed_self_align_masks, paired_sides, self_align_masks,
                            stack_right_padded)
from craft.engines import engine_name, objective_zero
from craft.errors import UserError
from craft.gradcache import contrastive_gradcache
from craft.hooks import last_hidden_state
from craft.packing import is_packed


class CRAFTContrastiveMixin:
    """Contrastive micro-batches of a CRAFT trainer (mixed into `craft.trainers.CRAFTTrainerMixin`)."""

    def _craft_contrastive_micro_batch_loss(self, model, batch) -> torch.Tensor:
        """The weighted InfoNCE of one contrastive micro-batch, through GradCache when `craft_use_gradcache`."""
        if self.args.craft_use_gradcache:
            return self._craft_gradcache_loss(model, batch)
        loss, _, _ = self._contrastive_loss(model, batch)
        return self._craft_scaler.micro_batch_loss(contrastive_loss=loss)

    def _contrastive_loss(self, model, batch):
        """InfoNCE of one contrastive micro-batch: (loss, logits [B, C], anchor embeddings [B, D]).

        Paired: anchors and positives are right-padded to one length and run through `model` in one forward
        (only the last position's logits are computed). Self-align: one forward, prompt vs assistant pooling.
        """
        if self.craft_self_align:
            anchor_mask, positive_mask, rows = self._craft_self_align_masks(batch)
            hidden, zero = self._forward_hidden(model, batch["input_ids"], batch.get("attention_mask"))
            loss, logits, anchors = self._pooled_infonce(hidden, anchor_mask, positive_mask, rows)
            return loss + zero, logits, anchors
        anchors, positives = paired_sides(batch)
        input_ids, attention_mask = stack_right_padded([anchors, positives])
        hidden, zero = self._forward_hidden(model, input_ids, attention_mask)
        size = anchors[0].shape[0]
        pooled = self.craft_objective.pool(hidden, attention_mask)
        loss, logits, anchor_embeddings = self._score(pooled[:size], pooled[size:])
        return loss + zero, logits, anchor_embeddings

    def _craft_gradcache_loss(self, model, batch) -> torch.Tensor:
        """A contrastive micro-batch through `craft.gradcache.contrastive_gradcache`; the tensor the Trainer
        backpropagates.

        GradCache backpropagates ``w_con · λ_con · InfoNCE`` through every chunk but the last one itself (without
        synchronisation). The returned tensor has that weighted value; its backward, run by the Trainer through
        the engine, is the last chunk's (and, with uncertainty balancing, adds the ``w_con · s_con`` term).
        """
        if self.craft_self_align:
            anchor_mask, positive_mask, rows = self._craft_self_align_masks(batch)
            if rows is not None:
                raise UserError("craft_use_gradcache does not take packed (padding-free) contrastive batches; give "
                                "the contrastive loader a padded collator (CRAFTCollator(padding_free=False))")
            ids, mask = ids_and_mask(batch, "")
            anchors, positives = (ids, mask, anchor_mask), (ids, mask, positive_mask)
        else:
            (ids_a, mask_a), (ids_p, mask_p) = paired_sides(batch)
            anchors, positives = (ids_a, mask_a, mask_a), (ids_p, mask_p, mask_p)
        scaler = self._craft_scaler
        weight = scaler.contrastive_weight()
        (loss, logits, anchor_embeddings), pending = contrastive_gradcache(
            lambda i, m: self._forward_hidden(model, i, m, touch_objective=True), self.craft_objective, anchors,
            positives,
            self.args.craft_gradcache_chunk_size, weight, no_sync=lambda: self.accelerator.no_sync(model),
            defer_last=True)
        self._craft_record_contrastive(loss, logits, anchor_embeddings)
        # The Trainer's backward of the returned tensor is the last chunk's (the engine's synchronising one);
        # its value is the weighted InfoNCE, for the logs.
        value = (weight * loss).detach().float() + (pending - pending.detach())
        regularizer = scaler.contrastive_regularizer()
        if regularizer is None:
            return value
        return regularizer + (value - regularizer.detach())

    def _forward_hidden(self, model, input_ids, attention_mask, touch_objective: bool = False):
        """(last hidden state [B, T, H], a zero tied to the logits and, with ``touch_objective`` (a GradCache chunk,
        whose backward does not use the objective), to the objective's parameters where the engine needs it)."""
        hidden, zero = forward_hidden(model, input_ids, attention_mask, self.args.craft_use_hidden_state_hook)
        return hidden, zero + (self._craft_unused_objective_zero(gradcache_chunk=True) if touch_objective else 0.0)

    def _craft_unused_objective_zero(self, gradcache_chunk: bool = False) -> torch.Tensor | float:
        """A zero touching the objective's parameters, for a backward that does not use them (an SFT micro-batch of
        the paired strategy, a GradCache chunk), where the engine needs one (`craft.engines.objective_zero`)."""
        return objective_zero(engine_name(self), self.craft_objective, gradcache_chunk)

    def _self_align_masks(self, batch):
        """(anchor mask, positive mask) [B, T] of a padded self-align batch (contrastive-ft 0.4.3's name)."""
        return self_align_masks(batch, self.args.craft_assistant_mask_key, self.args.craft_assistant_mask_strategy)

    def _craft_self_align_masks(self, batch):
        """(anchor mask, positive mask, rows): `_self_align_masks` and rows None, or for a packed batch one [S, T]
        mask pair per conversation and the row each lies in (`craft.encoding.packed_self_align_masks`)."""
        args = self.args
        if is_packed(batch):
            return packed_self_align_masks(batch, args.craft_assistant_mask_key, args.craft_assistant_mask_strategy)
        return (*self._self_align_masks(batch), None)

    # contrastive-ft 0.4.3's name for `craft.hooks.last_hidden_state`.
    _extract_last_hidden_state = staticmethod(last_hidden_state)

    def _pooled_infonce(self, hidden, anchor_mask, positive_mask, rows=None):
        objective = self.craft_objective
        return self._score(objective.pool(hidden, anchor_mask, rows), objective.pool(hidden, positive_mask, rows))

    def _score(self, pooled_anchors, pooled_positives):
        """The objective on pooled states, recorded for logging: (loss, logits, projected anchors)."""
        loss, logits, anchors = self.craft_objective(pooled_anchors, pooled_positives)
        self._craft_record_contrastive(loss, logits, anchors)
        return loss, logits, anchors
