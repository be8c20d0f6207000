"""The contrastive objective as one `nn.Module`: pooling, projection head, temperature, InfoNCE, the negatives
(other ranks' positives, the MoCo queue) and the gradient-balancing state.

The trainer attaches it to the model it trains (`attach_objective`: a submodule named ``craft_objective`` of the
transformers model), so DDP, DeepSpeed ZeRO and FSDP see its parameters like any other: they are broadcast,
all-reduced, sharded, put in the optimizer and in the engine's checkpoints. `save_pretrained` leaves them out
(they are listed in the model's ``_keys_to_ignore_on_save``), so a saved model stays a plain HF model; the
trainer writes the objective's state beside it (``craft_state.pt``, `ContrastiveObjective.craft_state_dict`).

For hidden states ``h`` [B, T, H] and a pooling mask [B, T], one contrastive term is

    a = g(pool(h, anchor_mask)),  p = g(pool(h', positive_mask))          g: ProjectionHead H -> D
    L = mean_i CE(s · cos(a_i, c_j) over candidates c, target p_i)      s = 1/τ (learnable or fixed)

with candidates ``c = [p (this rank) ; p of every other rank (craft_gather_negatives) ; queue]``. The other ranks'
positives keep their gradient: the backward of the gather sums every rank's gradient for them
(`craft.negatives.gather_negatives`), so with W ranks and the data-parallel average the step follows the
gradient of the same InfoNCE computed in one process over the global batch. The queue then enqueues every
rank's positives in rank order, so the queue is the same on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from craft.errors import UserError
from craft.balancing_step import GradientBalancing
from craft.losses import InfoNCELoss, ProjectionHead
from craft.metrics import EMAReference
from craft.negatives import NegativeQueue, distributed_world, gather_negatives

OBJECTIVE_NAME = "craft_objective"
EMA_DECAY = 0.99  # representation-consistency reference: roughly the last hundred contrastive batches


class ContrastiveObjective(nn.Module):
    """Pooling -> projection -> InfoNCE against in-batch, cross-rank and queued negatives.

    Parameters (trained by the optimizer): ``projection`` (`ProjectionHead`), ``infonce.log_temperature``
    (learnable temperature), ``balancing.log_vars`` (uncertainty balancing). State that is not a parameter:
    ``queue`` (`NegativeQueue` or None), ``balancer`` (`GradientBalancing`), ``ema`` (`EMAReference`).
    """

    def __init__(self, hidden_size: int, projection_dim: int = 256, projection_dropout: float = 0.0,
                 temperature: float = 0.05, learnable_temperature: bool = False, pooling: str = "last_token",
                 queue_size: int | None = None, balancing: str = "none", alpha: float = 0.6, seed: int = 0,
                 gather_negatives: bool | None = None, loss_scale_momentum: float = 0.99, gradnorm_alpha: float = 1.5,
                 clip_per_task: float | None = None):
        super().__init__()
        self.projection = ProjectionHead(hidden_size, projection_dim, dropout=projection_dropout)
        self.infonce = InfoNCELoss(temperature, learnable_temperature=learnable_temperature, pooling=pooling)
        self.balancer = GradientBalancing(balancing, alpha, seed=seed, momentum=loss_scale_momentum,
                                          gradnorm_alpha=gradnorm_alpha, clip_per_task=clip_per_task)
        if self.balancer.module is not None:
            self.balancing = self.balancer.module  # uncertainty's log-variances: trained and saved with the head
        self.queue = NegativeQueue(queue_size) if queue_size else None
        self.ema = EMAReference(EMA_DECAY)
        self.gather = gather_negatives  # None: gather when the process group has more than one rank

    @classmethod
    def from_config(cls, hidden_size: int, args) -> "ContrastiveObjective":
        """The objective a CRAFT config describes (`craft.config.CRAFTConfigMixin`)."""
        return cls(hidden_size, args.craft_projection_dim, args.craft_projection_dropout, args.craft_temperature,
                   args.craft_learnable_temperature, args.craft_pooling,
                   queue_size=args.craft_negative_queue_size if args.craft_negative_strategy == "queue" else None,
                   balancing=args.craft_gradient_balancing, alpha=args.craft_alpha, seed=args.seed,
                   gather_negatives=args.craft_gather_negatives, loss_scale_momentum=args.craft_loss_scale_momentum,
                   gradnorm_alpha=args.craft_gradnorm_alpha,
                   clip_per_task=args.craft_gradient_clip_value if args.craft_gradient_clip_per_task else None)

    @property
    def gathers_negatives(self) -> bool:
        """Whether this call's negatives include the other ranks' positives."""
        world = distributed_world()
        return world > 1 and (self.gather is None or bool(self.gather))

    def pool(self, hidden: Tensor, mask: Tensor | None, rows: Tensor | None = None) -> Tensor:
        """Pool hidden states [B, T, H] over ``mask`` [B, T] (`craft.losses.pool_hidden_states`): [B, H]; packed
        batches pool conversation ``s`` of row ``rows[s]`` over ``mask[s]`` ([S, T] -> [S, H])."""
        return self.infonce.pool(hidden, mask, rows)

    def project(self, pooled: Tensor) -> Tensor:
        """The projection head on pooled states [B, H] (cast to the head's dtype): [B, D]."""
        return self.projection(pooled.to(self.projection.fc1.weight.dtype))

    def forward(self, anchors: Tensor | None = None, positives: Tensor | None = None):
        """InfoNCE of pooled anchors and positives [B, H]: ``(loss, logits [B, C], projected anchors [B, D])``.

        Column i of the logits is row i's positive, so ``argmax == i`` is a hit (`craft.metrics`). The batch's
        positives (of every rank, when gathered) are enqueued after the loss is computed. Without ``positives``:
        `zero_touch`'s zero.
        """
        if positives is None:  # zero_touch: ``anchors`` is a leaf zero that requires grad (module docstring there)
            return torch.stack([p.sum() for p in self.parameters()]).sum() * anchors
        a, p = self.project(anchors), self.project(positives)
        candidates, everyone = [p], p.detach()
        if self.gathers_negatives:
            others, everyone = gather_negatives(p)
            candidates.append(others)
        queued = None if self.queue is None else self.queue.negatives()
        if queued is not None:
            candidates.append(queued.to(p.dtype))
        extra = torch.cat(candidates[1:]) if len(candidates) > 1 else None
        loss, logits = self.infonce(a, p, negatives=extra, return_logits=True)
        if self.queue is not None:
            self.queue.enqueue(everyone)  # after the loss: detached copies, written out of place
        return loss, logits, a

    def zero_touch(self) -> Tensor:
        """``0 · Σ params``: a zero whose backward gives every parameter a (zero) gradient, for micro-batches that
        do not use the objective (`craft.engines.objective_zero`: DDP, ZeRO-3).

        It is a call of this module with a zero input that requires grad: ZeRO-3 gathers a leaf module's parameters
        around its forward and backward, and reduces their gradients once the gradient of the module's inputs is
        computed, which is after the parameters' gradients (they come out of the same product node)."""
        return self(torch.zeros((), device=self.projection.fc1.weight.device, requires_grad=True))

    # ------------------------------------------------------------------------------------------------ state

    def craft_state_dict(self, tensors: dict[str, Tensor] | None = None) -> dict:
        """Everything needed to resume: parameters (``tensors`` if given, e.g. gathered from shards, else this
        module's own), queue, balancing and EMA state."""
        modules = {k: v.detach().cpu() for k, v in (tensors if tensors is not None else self.state_dict()).items()}
        state = {"modules": modules, "ema": self.ema.state_dict(), "balancing": self.balancer.state_dict()}
        if self.queue is not None:
            state["queue"] = self.queue.state_dict()
        return state

    def load_craft_state_dict(self, state: dict, load_modules: bool = True) -> None:
        """Restore a `craft_state_dict`; ``load_modules=False`` (or a state without ``"modules"``) keeps the
        parameters (an engine restored them)."""
        if load_modules and "modules" in state:
            self.load_state_dict(state["modules"])
        self.ema.load_state_dict(state["ema"])
        if "balancing" in state:
            self.balancer.load_state_dict(state["balancing"])
        if self.queue is not None:
            if "queue" not in state:
                raise UserError("the checkpoint has no negative queue (it was trained without "
                                "craft_negative_strategy='queue'); resume with the same strategy")
            device = self.projection.fc1.weight.device
            self.queue.load_state_dict(state["queue"], device=device)


def attach_objective(model: nn.Module, objective: ContrastiveObjective) -> None:
    """Register ``objective`` as the submodule ``craft_objective`` of the transformers model ``model`` and keep its
    keys out of ``save_pretrained``."""
    model.add_module(OBJECTIVE_NAME, objective)
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    model._keys_to_ignore_on_save = ignored | {f"{OBJECTIVE_NAME}.{k}" for k in objective.state_dict()}
