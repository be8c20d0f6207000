r"""Gradient balancing between the SFT loss and the contrastive loss (``craft_gradient_balancing``).

The CRAFT objective of one optimizer step is ``J = a_sft · L_sft + a_con · L_con`` with the base weights
``a_sft = craft_alpha`` and ``a_con = 1 - craft_alpha``. A balancing strategy multiplies each task's base weight by
a balancing weight ``λ_i``, so the effective weight is ``a_i · λ_i``: alpha stays the base ratio, and with
``λ_sft = λ_con`` the step is the plain CRAFT step up to a common factor. Tasks are indexed 0 = SFT,
1 = contrastive (`TASKS`).

* ``none`` — ``λ_i = 1``.
* ``loss_scale`` — `LossScaleBalancer`: ``λ_i = 1 / m_i`` with ``m_i`` the running mean of ``L_i``
  (``m_i ← μ·m_i + (1-μ)·L_i``, the first value initialises it), so each task contributes a gradient of
  comparable size whatever its loss scale.
* ``uncertainty`` — `UncertaintyBalancer` (Kendall, Gal & Cipolla, CVPR 2018): learned log-variances
  ``s_i = log σ_i²`` and ``J = Σ_i a_i · (exp(-s_i) · L_i + s_i)``. This is the variant without the ½ factors of the
  paper's Gaussian likelihood (``½·exp(-s)·L + ½·s``): twice that objective, the same minimiser
  ``s_i = log L_i``, and ``λ_i = exp(-s_i)``. The ``s_i`` are parameters trained by the optimizer.
* ``gradnorm`` — `GradNormBalancer` (Chen et al., ICML 2018): weights ``w_i`` (``λ_i = w_i``) updated after every
  step so that ``G_i = ‖∇_W w_i L_i‖`` approaches ``Ḡ · r_i^γ`` (``Ḡ`` = mean G, ``r_i`` = relative inverse training
  rate ``(L_i / L_i(0)) / mean_j(L_j / L_j(0))``, γ = ``asymmetry``), the target held constant; then renormalised
  to ``Σ w_i = T`` (number of tasks). W is the last shared layer (the trainer uses the trainable parameters of the
  last decoder block).
* ``pcgrad`` — `pcgrad` (Yu et al., NeurIPS 2020): per-task gradients ``g_i`` of the shared trainable parameters;
  for each i, in random order over j ≠ i, if ``g_i·g_j < 0`` then ``g_i ← g_i - (g_i·g_j / ‖g_j‖²) g_j``; the step
  uses ``Σ_i g_i`` (``λ_i = 1``; the base weights are inside ``g_i = ∇(a_i L_i)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from craft.errors import UserError

TASKS = ("sft", "contrastive")
STRATEGIES = ("none", "loss_scale", "uncertainty", "gradnorm", "pcgrad")
# Strategies that need each task's gradient separately (the others only rescale the losses).
PER_TASK_GRADIENT_STRATEGIES = ("gradnorm", "pcgrad")


class LossScaleBalancer:
    """``λ_i = 1 / m_i``, ``m_i`` the running mean of task i's loss (``m_i ← μ m_i + (1-μ) L_i``; μ = ``momentum``).

    ``observe(i, L_i)`` folds in a new loss value (the first one sets ``m_i = L_i``); ``weight(i)`` is ``1 / m_i``
    (1 before any value). Example: losses 2.0 then 4.0 with μ = 0.5 give m = 2.0, then 3.0, so λ = 0.5, then 1/3.
    """

    def __init__(self, num_tasks: int = 2, momentum: float = 0.99, eps: float = 1e-8):
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"loss_scale momentum must be in [0, 1); got {momentum}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.running_mean: list[float | None] = [None] * num_tasks

    def observe(self, task: int, loss: float | Tensor) -> None:
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        if not math.isfinite(value):
            return  # a non-finite loss would poison the mean forever; the step itself reports it
        mean = self.running_mean[task]
        self.running_mean[task] = value if mean is None else self.momentum * mean + (1.0 - self.momentum) * value

    def weight(self, task: int) -> float:
        mean = self.running_mean[task]
        return 1.0 if mean is None else 1.0 / max(abs(mean), self.eps)

    def state_dict(self) -> dict:
        return {"running_mean": list(self.running_mean), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.running_mean = list(state["running_mean"])
        self.momentum = float(state["momentum"])


class UncertaintyBalancer(nn.Module):
    """Learned log-variances ``s = log σ²`` [T] (init 0): ``J = Σ_i a_i (exp(-s_i) L_i + s_i)``; ``λ_i = exp(-s_i)``.

    ``task_objective(i, loss, units)`` is the term ``exp(-s_i) · loss + s_i · units``: with ``loss`` a sum over
    ``units`` items of a task's per-item loss, summing it over micro-batches and dividing by the total units gives
    ``exp(-s_i) L_i + s_i`` — which is how the trainer folds it into its exact accumulation. Its gradient in
    ``s_i`` is ``units - exp(-s_i)·loss``, zero when ``s_i = log(loss / units)``.
    """

    def __init__(self, num_tasks: int = 2):
        super().__init__()
        self.log_variance = nn.Parameter(torch.zeros(num_tasks))

    def weight(self, task: int) -> Tensor:
        return torch.exp(-self.log_variance[task])

    def task_objective(self, task: int, loss: Tensor, units: float = 1.0) -> Tensor:
        s = self.log_variance[task]
        return torch.exp(-s).to(loss.dtype) * loss + s.to(loss.dtype) * units

    def objective(self, losses: Sequence[Tensor], base_weights: Sequence[float]) -> Tensor:
        """``Σ_i a_i (exp(-s_i) L_i + s_i)`` for the task losses ``L_i`` and base weights ``a_i``."""
        return sum(a * self.task_objective(i, loss) for i, (loss, a) in enumerate(zip(losses, base_weights)))


class GradNormBalancer:
    r"""GradNorm task weights ``w`` [T] (init 1), updated once per optimizer step by `update`.

    Given the task losses ``L_i`` and the norms ``n_i = ‖∇_W L_i‖`` of each unweighted task gradient on the shared
    layer W, with ``G_i = w_i n_i``, ``Ḡ = mean_i G_i``, ``r_i = (L_i/L_i(0)) / mean_j (L_j/L_j(0))`` (``L_i(0)`` = the
    first losses seen) and the target ``t_i = Ḡ · r_i^γ`` held constant, the loss
    ``L_grad = Σ_i |G_i - t_i|`` has gradient ``∂L_grad/∂w_i = sign(G_i - t_i) · n_i``. One step of gradient descent
    with learning rate ``lr``, weights clamped at ``min_weight`` and renormalised: ``w ← T · w / Σ w``.
    """

    def __init__(self, num_tasks: int = 2, asymmetry: float = 1.5, lr: float = 0.025, min_weight: float = 1e-3):
        if lr <= 0:
            raise UserError(f"gradnorm learning rate must be > 0; got {lr}")
        self.asymmetry, self.lr, self.min_weight = float(asymmetry), float(lr), float(min_weight)
        self.weights = torch.ones(num_tasks, dtype=torch.float64)
        self.initial_losses: Tensor | None = None

    def weight(self, task: int) -> float:
        return float(self.weights[task])

    def update(self, losses: Sequence[float], grad_norms: Sequence[float]) -> Tensor:
        """One GradNorm step from this step's losses and unweighted shared-layer gradient norms; returns ``w``."""
        losses = torch.as_tensor([float(v) for v in losses], dtype=torch.float64)
        norms = torch.as_tensor([float(v) for v in grad_norms], dtype=torch.float64)
        if self.initial_losses is None:
            self.initial_losses = losses.clamp_min(1e-12)
        weighted = self.weights * norms  # G_i
        relative = losses / self.initial_losses  # L_i / L_i(0)
        inverse_rate = relative / relative.mean()  # r_i
        target = weighted.mean() * inverse_rate.pow(self.asymmetry)  # constant: no gradient through it
        grad = torch.sign(weighted - target) * norms
        updated = (self.weights - self.lr * grad).clamp_min(self.min_weight)
        self.weights = updated * (len(updated) / updated.sum())
        return self.weights.clone()

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "initial_losses": self.initial_losses}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].to(torch.float64).clone()
        initial = state["initial_losses"]
        self.initial_losses = None if initial is None else initial.to(torch.float64).clone()


def pcgrad(task_grads: Sequence[Tensor], generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's combined gradient ``Σ_i g_i^PC`` for flattened per-task gradients ``task_grads[i]`` [P].

    For each task i, ``g_i^PC`` starts as ``g_i`` and, for the other tasks j in a random order (``generator``),
    ``g_i^PC ← g_i^PC - (g_i^PC·g_j / ‖g_j‖²) g_j`` whenever ``g_i^PC·g_j < 0`` (the projections use the original
    ``g_j``). Computed in float64 and returned in the dtype of ``task_grads[0]``.
    """
    grads = [g.detach().reshape(-1).double() for g in task_grads]
    projected = []
    for i, g_i in enumerate(grads):
        current = g_i.clone()
        others = [j for j in range(len(grads)) if j != i]
        for k in torch.randperm(len(others), generator=generator).tolist():
            g_j = grads[others[k]]
            dot = torch.dot(current, g_j)
            norm_sq = torch.dot(g_j, g_j)
            if dot < 0 and norm_sq > 0:
                current = current - (dot / norm_sq) * g_j
        projected.append(current)
    return torch.stack(projected).sum(0).to(task_grads[0].dtype)


def make_balancer(strategy: str, num_tasks: int = 2):
    """The balancer object of ``craft_gradient_balancing`` (None for "none" and "pcgrad", which keep no state)."""
    if strategy not in STRATEGIES:
        raise UserError(f"craft_gradient_balancing must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy == "loss_scale":
        return LossScaleBalancer(num_tasks)
    if strategy == "uncertainty":
        return UncertaintyBalancer(num_tasks)
    if strategy == "gradnorm":
        return GradNormBalancer(num_tasks)
    return None


# ------------------------------------------------------------------------------------- trainer integration

SFT_TASK, CONTRASTIVE_TASK = 0, 1


class GradientBalancing:
    """The trainer-side state of ``craft_gradient_balancing``: the λ of the current optimizer step, their update
    when a step ends, and (gradnorm, pcgrad) the per-task gradients of the step.

    ``module`` is the `nn.Module` whose parameters the optimizer trains (uncertainty's log-variances), else None.
    λ stays fixed within one step, so a step optimises exactly ``Σ_i a_i λ_i L_i`` (uncertainty: the objective
    of `UncertaintyBalancer`): loss_scale's running means and GradNorm's weights are updated when the step ends,
    from the step's (rank-averaged) losses, and apply from the next step on (λ = 1 before a task's first loss).
    """

    def __init__(self, strategy: str, alpha: float, seed: int = 0):
        self.strategy, self.alpha = strategy, float(alpha)
        self.balancer = make_balancer(strategy)
        self.module = self.balancer if isinstance(self.balancer, nn.Module) else None
        self.per_task_gradients = strategy in PER_TASK_GRADIENT_STRATEGIES
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

        ``average`` (a function on a flat tensor) averages the per-task gradients over ranks first. PCGrad
        projects over the parameters both tasks reach (the shared trainable ones) and sums the rest. GradNorm
        sums the tasks' gradients (already weighted by the current ``w``) and updates ``w`` from the unweighted
        norms ``‖g_i‖ / (a_i w_i)`` on the parameters at indices ``shared_layer`` (the last shared layer W).
        """
        flat = {task: self._flatten(params, task) for task in (SFT_TASK, CONTRASTIVE_TASK)}
        if average is not None:
            flat = {task: average(vector) for task, vector in flat.items()}
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
