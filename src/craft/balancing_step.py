"""The trainer-side state of ``craft_gradient_balancing`` for one optimizer step: the balancing weights λ of the
step (`GradientBalancing`), their update when it ends, the per-task gradients that gradnorm, pcgrad and
``craft_gradient_clip_per_task`` need, and the micro-batch loss weights with balancing (`BalancedScaler`).
The balancers and their math are in `craft.gradient_balancing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from craft.errors import UserError
from craft.gradient_balancing import (
    PER_TASK_GRADIENT_STRATEGIES,
    TASKS,
    GradNormBalancer,
    LossScaleBalancer,
    UncertaintyBalancer,
    make_balancer,
    pcgrad,
)

def clip_to_norm(vector: Tensor, max_norm: float) -> Tensor:
    """``vector · min(1, max_norm / ‖vector‖₂)``: the gradient clipped to L2 norm ``max_norm`` (unchanged below it)."""
    norm = vector.norm()
    return vector * (max_norm / norm) if norm > max_norm else vector


SFT_TASK, CONTRASTIVE_TASK = 0, 1


class GradientBalancing:
    """The trainer-side state of ``craft_gradient_balancing``: the λ of the current optimizer step, their update
    when a step ends, and (gradnorm, pcgrad) the per-task gradients of the step.

    ``module`` is the `nn.Module` whose parameters the optimizer trains (uncertainty's log-variances), else None.
    λ stays fixed within one step, so a step optimises exactly ``Σ_i a_i λ_i L_i`` (uncertainty: the objective
    of `UncertaintyBalancer`): loss_scale's running means and GradNorm's weights are updated when the step ends,
    from the step's (rank-averaged) losses, and apply from the next step on (λ = 1 before a task's first loss).
    """

    def __init__(self, strategy: str, alpha: float, seed: int = 0, momentum: float = 0.99,
                 gradnorm_alpha: float = 1.5, clip_per_task: float | None = None):
        self.strategy, self.alpha = strategy, float(alpha)
        self.balancer = make_balancer(strategy, momentum=momentum, alpha=gradnorm_alpha)
        self.module = self.balancer if isinstance(self.balancer, nn.Module) else None
        # craft_gradient_clip_per_task: each task's step gradient is clipped on its own, so it is kept apart too.
        self.clip_per_task = clip_per_task
        self.per_task_gradients = strategy in PER_TASK_GRADIENT_STRATEGIES or clip_per_task is not None
        self.generator = torch.Generator().manual_seed(seed)  # PCGrad's random order, identical on every rank
        self._buffers: dict[int, list[Tensor | None]] = {}

    def weight(self, task: int) -> float | Tensor:
        """λ_task (a tensor with a graph for uncertainty)."""
        if self.balancer is None:
            return 1.0
        return self.balancer.weight(task)

    def effective_weights(self) -> dict[str, float]:
        """``a_i · λ_i`` per task, for the logs."""
        base = {SFT_TASK: self.alpha, CONTRASTIVE_TASK: 1.0 - self.alpha}
        return {TASKS[task]: a * float(torch.as_tensor(self.weight(task)).detach()) for task, a in base.items()}

    def task_term(self, task: int, base_weight: float, loss: Tensor, units: float) -> Tensor:
        """A micro-batch's weighted contribution: ``base_weight · λ · loss`` (uncertainty:
        ``base_weight · (exp(-s) · loss + s · units)``), ``loss`` being a sum over ``units`` items."""
        if isinstance(self.balancer, UncertaintyBalancer):
            return base_weight * self.balancer.task_objective(task, loss, units)
        return (base_weight * self.weight(task)) * loss

    def end_step(self, losses: dict[int, float]) -> None:
        """Fold the step's task losses (already averaged over ranks) into loss_scale's running means."""
        if isinstance(self.balancer, LossScaleBalancer):
            for task, value in losses.items():
                self.balancer.observe(task, value)

    # -- per-task gradients (gradnorm, pcgrad)

    def collect(self, params: Sequence[Tensor], task: int) -> None:
        """Move the gradients accumulated since the last call into task ``task``'s buffer (``.grad`` -> None)."""
        buffer = self._buffers.setdefault(task, [None] * len(params))
        for index, param in enumerate(params):
            if param.grad is None:
                continue
            buffer[index] = param.grad if buffer[index] is None else buffer[index] + param.grad
            param.grad = None

    def combine(self, params: Sequence[Tensor], losses: dict[int, float], shared_layer: Sequence[int],
                average=None) -> None:
        """Write the step's combined gradient into ``.grad`` and clear the buffers.

        ``average`` (a function on a flat tensor) averages the per-task gradients over ranks first; with
        ``clip_per_task`` each task's gradient is then scaled to an L2 norm of at most that value. PCGrad
        projects over the parameters both tasks reach (the shared trainable ones) and sums the rest. GradNorm
        sums the tasks' gradients (already weighted by the current ``w``) and updates ``w`` from the unweighted
        norms ``‖g_i‖ / (a_i w_i)`` on the parameters at indices ``shared_layer`` (the last shared layer W).
        """
        flat = {task: self._flatten(params, task) for task in (SFT_TASK, CONTRASTIVE_TASK)}
        if average is not None:
            flat = {task: average(vector) for task, vector in flat.items()}
        if self.clip_per_task is not None:
            flat = {task: clip_to_norm(vector, self.clip_per_task) for task, vector in flat.items()}
        self._buffers.clear()
        sizes = [p.numel() for p in params]
        per_param = {task: list(vector.split(sizes)) for task, vector in flat.items()}
        if self.strategy == "pcgrad":
            total = self._pcgrad(per_param)
        else:
            total = [a + b for a, b in zip(per_param[SFT_TASK], per_param[CONTRASTIVE_TASK])]
            self._gradnorm_update(per_param, losses, shared_layer)
        for param, grad in zip(params, total):
            param.grad = grad.view_as(param).to(param.dtype)

    def _flatten(self, params, task) -> Tensor:
        buffer = self._buffers.get(task, [None] * len(params))
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p, g in zip(params, buffer)])

    def _pcgrad(self, per_param) -> list[Tensor]:
        sft, con = per_param[SFT_TASK], per_param[CONTRASTIVE_TASK]
        shared = [i for i, (a, b) in enumerate(zip(sft, con)) if bool(a.any()) and bool(b.any())]
        total = [a + b for a, b in zip(sft, con)]
        if shared:
            combined = pcgrad([torch.cat([sft[i] for i in shared]), torch.cat([con[i] for i in shared])],
                              generator=self.generator)
            for i, part in zip(shared, combined.split([sft[i].numel() for i in shared])):
                total[i] = part
        return total

    def _gradnorm_update(self, per_param, losses, shared_layer) -> None:
        if not isinstance(self.balancer, GradNormBalancer) or len(losses) < 2:
            return  # GradNorm needs both tasks in the step
        norms = []
        for task, base in ((SFT_TASK, self.alpha), (CONTRASTIVE_TASK, 1.0 - self.alpha)):
            weighted = torch.cat([per_param[task][i] for i in shared_layer]).norm()
            scale = base * self.balancer.weight(task)
            norms.append(float(weighted) / scale if scale > 0 else 0.0)
        self.balancer.update([losses[SFT_TASK], losses[CONTRASTIVE_TASK]], norms)

    def state_dict(self) -> dict:
        state = {"strategy": self.strategy}
        if isinstance(self.balancer, (LossScaleBalancer, GradNormBalancer)):
            state["balancer"] = self.balancer.state_dict()
        return state  # uncertainty's parameters are saved with the module that holds them

    def load_state_dict(self, state: dict) -> None:
        if state.get("strategy") != self.strategy:
            raise UserError(f"the checkpoint was trained with craft_gradient_balancing={state.get('strategy')!r}; "
                            f"this run uses {self.strategy!r}")
        if "balancer" in state:
            self.balancer.load_state_dict(state["balancer"])


class BalancedScaler:
    """`craft.accumulator.AccumulationScaler` with balancing: ``loss_b = λ_sft w_tok S_b + λ_con w_con C_b``.

    With per-task gradients (gradnorm, pcgrad) and a micro-batch holding both losses (self-align), the
    contrastive part is handed to ``split_backward`` (which backpropagates it into its own buffer) and only the
    SFT part is returned.
    """

    def __init__(self, scaler, balancing: GradientBalancing, split_backward=None):
        self.scaler, self.balancing, self.split_backward = scaler, balancing, split_backward

    @property
    def counts(self):
        return self.scaler.counts

    @property
    def sft_token_weight(self) -> float:
        return self.scaler.sft_token_weight

    @property
    def contrastive_term_weight(self) -> float:
        return self.scaler.contrastive_term_weight

    def contrastive_weight(self) -> float | Tensor:
        """The factor on one InfoNCE term, w_con · λ_con (for GradCache's cached backward)."""
        return self.scaler.contrastive_term_weight * self.balancing.weight(CONTRASTIVE_TASK)

    def contrastive_regularizer(self) -> Tensor | None:
        """Uncertainty's ``w_con · s_con`` for one InfoNCE term (None for the other strategies)."""
        balancer = self.balancing.balancer
        if not isinstance(balancer, UncertaintyBalancer):
            return None
        return self.scaler.contrastive_term_weight * balancer.log_variance[CONTRASTIVE_TASK]

    def micro_batch_loss(self, sft_token_sum: Tensor | None = None, contrastive_loss: Tensor | None = None,
                         sft_tokens: int | None = None) -> Tensor:
        """The balanced loss_b; ``sft_tokens`` (the micro-batch's SFT target count) is needed with an SFT part."""
        parts = []
        if sft_token_sum is not None:
            if sft_tokens is None:
                raise ValueError("micro_batch_loss needs sft_tokens with an SFT token sum")
            parts.append(self.balancing.task_term(SFT_TASK, self.scaler.sft_token_weight, sft_token_sum, sft_tokens))
        if contrastive_loss is not None:
            term = self.balancing.task_term(CONTRASTIVE_TASK, self.scaler.contrastive_term_weight, contrastive_loss, 1)
            if parts and self.split_backward is not None and self.balancing.per_task_gradients:
                self.split_backward(term)
            else:
                parts.append(term)
        if not parts:
            raise ValueError("micro_batch_loss needs an SFT token sum, a contrastive loss, or both")
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]
