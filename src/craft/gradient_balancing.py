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


class GradientBalancer:
    """Base of the balancers: tasks named ``task_names`` (or ``TASKS[:n]`` for an int n), indexed 0..T-1.

    contrastive-ft 0.4.3's interface: ``compute_weights(losses: {name: loss}, model=None) -> {name: weight}`` and
    ``step()`` after each optimizer step (counted in ``_step``). Methods taking a ``task`` accept its index or name.
    """

    def __init__(self, task_names: Sequence[str] | int = 2, device: torch.device | str | None = None):
        self._init_tasks(task_names, device)

    def _init_tasks(self, task_names, device) -> None:
        names = list(TASKS[:task_names]) if isinstance(task_names, int) else [str(n) for n in task_names]
        if isinstance(task_names, int) and task_names > len(TASKS):
            names += [f"task{i}" for i in range(len(TASKS), task_names)]
        self.task_names = names
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._step = 0

    def _index(self, task: int | str) -> int:
        return task if isinstance(task, int) else self.task_names.index(task)

    def compute_weights(self, losses: dict, model: nn.Module | None = None) -> dict[str, float]:
        """The weight of each task for these losses (subclasses define it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define compute_weights")

    def step(self) -> None:
        """Called after each optimizer step."""
        self._step += 1


def _as_float(value) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


class LossScaleBalancer(GradientBalancer):
    """``λ_i = 1 / m_i``, ``m_i`` the running mean of task i's loss (``m_i ← μ m_i + (1-μ) L_i``; μ = ``momentum``).

    ``observe(i, L_i)`` folds in a new loss value (the first one sets ``m_i = L_i``); ``weight(i)`` is ``1 / m_i``
    (1 before any value). Example: losses 2.0 then 4.0 with μ = 0.5 give m = 2.0, then 3.0, so λ = 0.5, then 1/3.
    ``compute_weights`` (contrastive-ft's interface) observes the given losses and returns ``λ`` normalised to
    sum to the number of tasks, uniform (1.0) during the first ``warmup_steps`` steps; a task without a loss
    gets 1.0. The trainers use ``weight`` (no warmup, not normalised: the normalisation only rescales the step).
    """

    def __init__(self, task_names: Sequence[str] | int = 2, device=None, momentum: float = 0.99,
                 warmup_steps: int = 0, eps: float = 1e-8):
        self._init_tasks(task_names, device)
        if not 0.0 <= momentum < 1.0:
            raise UserError(f"loss_scale momentum must be in [0, 1); got {momentum}")
        self.momentum, self.eps, self.warmup_steps = float(momentum), float(eps), int(warmup_steps)
        self.running_mean: list[float | None] = [None] * len(self.task_names)

    @property
    def _running_means(self) -> dict[str, float]:
        return {name: 1.0 if m is None else m for name, m in zip(self.task_names, self.running_mean)}

    def observe(self, task: int | str, loss: float | Tensor) -> None:
        value, task = _as_float(loss), self._index(task)
        if not math.isfinite(value):
            return  # a non-finite loss would poison the mean forever; the step itself reports it
        mean = self.running_mean[task]
        self.running_mean[task] = value if mean is None else self.momentum * mean + (1.0 - self.momentum) * value

    def weight(self, task: int | str) -> float:
        mean = self.running_mean[self._index(task)]
        return 1.0 if mean is None else 1.0 / max(abs(mean), self.eps)

    def compute_weights(self, losses: dict, model: nn.Module | None = None) -> dict[str, float]:
        weights = {}
        for name in self.task_names:
            if name not in losses:
                weights[name] = 1.0
                continue
            self.observe(name, losses[name])
            weights[name] = 1.0 if self._step < self.warmup_steps else self.weight(name)
        total = sum(weights.values())
        return {name: w * len(weights) / total for name, w in weights.items()}

    def state_dict(self) -> dict:
        return {"running_mean": list(self.running_mean), "momentum": self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self.running_mean = list(state["running_mean"])
        self.momentum = float(state["momentum"])


class UncertaintyBalancer(GradientBalancer, nn.Module):
    """Learned log-variances ``s_i = log σ_i²`` (init ``initial_log_var``), one parameter per task in
    ``log_vars`` (``log_variance`` stacks them, [T]): ``J = Σ_i a_i (exp(-s_i) L_i + s_i)``; ``λ_i = exp(-s_i)``.

    ``task_objective(i, loss, units)`` is the term ``exp(-s_i) · loss + s_i · units``: with ``loss`` a sum over
    ``units`` items of a task's per-item loss, summing it over micro-batches and dividing by the total units gives
    ``exp(-s_i) L_i + s_i`` — which is how the trainer folds it into its exact accumulation. Its gradient in
    ``s_i`` is ``units - exp(-s_i)·loss``, zero when ``s_i = log(loss / units)``.
    contrastive-ft's interface (`UncertaintyWeightingBalancer`) states the paper's halved form, the same
    objective over two: ``compute_weights`` gives ``exp(-s_i) / 2`` and ``get_regularization_loss()`` ``Σ s_i / 2``.
    """

    def __init__(self, task_names: Sequence[str] | int = 2, device=None, initial_log_var: float = 0.0):
        nn.Module.__init__(self)
        self._init_tasks(task_names, device)
        self.log_vars = nn.ParameterDict({name: nn.Parameter(torch.tensor(float(initial_log_var), device=self.device))
                                          for name in self.task_names})

    @property
    def log_variance(self) -> Tensor:
        return torch.stack([self.log_vars[name] for name in self.task_names])  # task order (the dict sorts keys)

    def weight(self, task: int | str) -> Tensor:
        return torch.exp(-self.log_vars[self.task_names[self._index(task)]])

    def task_objective(self, task: int | str, loss: Tensor, units: float = 1.0) -> Tensor:
        s = self.log_vars[self.task_names[self._index(task)]]
        return torch.exp(-s).to(loss.dtype) * loss + s.to(loss.dtype) * units

    def objective(self, losses: Sequence[Tensor], base_weights: Sequence[float]) -> Tensor:
        """``Σ_i a_i (exp(-s_i) L_i + s_i)`` for the task losses ``L_i`` and base weights ``a_i``."""
        return sum(a * self.task_objective(i, loss) for i, (loss, a) in enumerate(zip(losses, base_weights)))

    def compute_weights(self, losses: dict, model: nn.Module | None = None) -> dict[str, float]:
        return {name: float(self.weight(name).detach()) / 2 for name in self.task_names}

    def get_regularization_loss(self) -> Tensor:
        return self.log_variance.sum() / 2


UncertaintyWeightingBalancer = UncertaintyBalancer  # contrastive-ft 0.4.3's name


class GradNormBalancer(GradientBalancer):
    r"""GradNorm task weights ``w`` [T] (init 1; the parameters ``task_weights``), updated once per optimizer step.

    Given the task losses ``L_i`` and the norms ``n_i = ‖∇_W L_i‖`` of each unweighted task gradient on the shared
    layer W, with ``G_i = w_i n_i``, ``Ḡ = mean_i G_i``, ``r_i = (L_i/L_i(0)) / mean_j (L_j/L_j(0))`` (``L_i(0)`` = the
    first losses seen) and the target ``t_i = Ḡ · r_i^γ`` held constant (γ = ``alpha``, the asymmetry), the loss
    ``L_grad = Σ_i |G_i - t_i|`` has gradient ``∂L_grad/∂w_i = sign(G_i - t_i) · n_i``. `update` takes one step of
    gradient descent with learning rate ``lr``, clamps the weights at ``min_weight`` and renormalises:
    ``w ← T · w / Σ w``. contrastive-ft's interface: ``compute_weights`` records the losses and returns ``w``;
    ``compute_gradnorm_loss(task_losses, shared_params)`` returns ``L_grad`` with its gradient in ``w`` (for an
    optimizer over ``parameters()``).
    """

    def __init__(self, task_names: Sequence[str] | int = 2, device=None, alpha: float = 1.5,
                 initial_losses: dict | None = None, lr: float = 0.025, min_weight: float = 1e-3,
                 asymmetry: float | None = None):
        self._init_tasks(task_names, device)
        if lr <= 0:
            raise UserError(f"gradnorm learning rate must be > 0; got {lr}")
        self.alpha = float(alpha if asymmetry is None else asymmetry)
        self.lr, self.min_weight = float(lr), float(min_weight)
        one = torch.ones((), dtype=torch.float64, device=self.device)
        self.task_weights = nn.ParameterDict({name: nn.Parameter(one.clone()) for name in self.task_names})
        self._initial_losses: dict[str, float] = dict(initial_losses or {})
        self._current_losses: dict[str, float] = {}

    @property
    def asymmetry(self) -> float:
        return self.alpha

    @property
    def weights(self) -> Tensor:
        return torch.stack([self.task_weights[n].detach() for n in self.task_names]).to(torch.float64).cpu()

    @weights.setter
    def weights(self, values: Tensor) -> None:
        with torch.no_grad():
            for name, value in zip(self.task_names, values.tolist()):
                self.task_weights[name].fill_(value)

    @property
    def initial_losses(self) -> Tensor | None:
        if len(self._initial_losses) < len(self.task_names):
            return None
        return torch.tensor([self._initial_losses[n] for n in self.task_names], dtype=torch.float64).clamp_min(1e-12)

    def parameters(self):
        return self.task_weights.parameters()

    def weight(self, task: int | str) -> float:
        return float(self.task_weights[self.task_names[self._index(task)]].detach())

    def _record(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self._current_losses[name] = value
            self._initial_losses.setdefault(name, value)

    def _targets(self, weighted: Tensor, losses: Tensor, initial: Tensor) -> Tensor:
        """``t_i = mean(G) · r_i^γ`` (no gradient) for ``G`` [T], the current and the first losses [T]."""
        relative = (losses / initial.to(losses)).to(weighted.dtype)
        return weighted.detach().mean() * (relative / relative.mean()).pow(self.alpha)

    def update(self, losses: Sequence[float], grad_norms: Sequence[float]) -> Tensor:
        """One GradNorm step from this step's losses and unweighted shared-layer gradient norms; returns ``w``."""
        self._record({name: float(v) for name, v in zip(self.task_names, losses)})
        losses = torch.as_tensor([self._current_losses[n] for n in self.task_names], dtype=torch.float64)
        norms = torch.as_tensor([float(v) for v in grad_norms], dtype=torch.float64)
        weighted = self.weights * norms  # G_i
        grad = torch.sign(weighted - self._targets(weighted, losses, self.initial_losses)) * norms
        updated = (self.weights - self.lr * grad).clamp_min(self.min_weight)
        self.weights = updated * (len(updated) / updated.sum())
        return self.weights.clone()

    def compute_weights(self, losses: dict, model: nn.Module | None = None) -> dict[str, float]:
        self._record({name: _as_float(loss) for name, loss in losses.items()})
        return {name: self.weight(name) for name in self.task_names}

    def compute_gradnorm_loss(self, task_losses: dict[str, Tensor], shared_params: Sequence[Tensor]) -> Tensor:
        """``Σ_i |w_i n_i - t_i|`` over the tasks in ``task_losses`` (``n_i`` = ‖∇ L_i‖ over ``shared_params``)."""
        names = [n for n in self.task_names if n in task_losses]
        if len(names) < 2 or self.initial_losses is None:
            return torch.zeros((), device=self.device)
        norms = []
        for name in names:
            grads = torch.autograd.grad(task_losses[name], list(shared_params), retain_graph=True, allow_unused=True)
            norms.append(torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads if g is not None)))
        norms = torch.stack(norms).to(self.device)
        weights = torch.stack([self.task_weights[n] for n in names])
        current = torch.tensor([self._current_losses[n] for n in names], dtype=torch.float64)
        initial = torch.tensor([self._initial_losses[n] for n in names], dtype=torch.float64).clamp_min(1e-12)
        weighted = weights * norms
        return (weighted - self._targets(weighted, current, initial)).abs().sum()

    def state_dict(self) -> dict:
        return {"weights": self.weights.clone(), "initial_losses": self.initial_losses}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].to(torch.float64)
        initial = state["initial_losses"]
        self._initial_losses = {} if initial is None else dict(zip(self.task_names, initial.tolist()))


class PCGradBalancer(GradientBalancer):
    """PCGrad as a balancer object: uniform weights (it changes the gradients, not the losses) and
    `project_conflicting_gradients`. The trainers use `pcgrad`, which adds the projected gradients."""

    def compute_weights(self, losses: dict, model: nn.Module | None = None) -> dict[str, float]:
        return {name: 1.0 for name in self.task_names}

    def weight(self, task: int | str) -> float:
        return 1.0

    @staticmethod
    def project_conflicting_gradients(gradients: Sequence[Tensor],
                                      generator: torch.Generator | None = None) -> list[Tensor]:
        """``[g_i^PC]``: for each i, ``g_i^PC ← g_i^PC - (g_i^PC·g_j / ‖g_j‖²) g_j`` whenever ``g_i^PC·g_j < 0``, over
        the other tasks j (the original ``g_j``) in order, or in a random order drawn from ``generator``.
        Computed in float64; each result has its input's shape and dtype."""
        grads = [g.detach().reshape(-1).double() for g in gradients]
        projected = []
        for i, g_i in enumerate(grads):
            current = g_i.clone()
            others = [j for j in range(len(grads)) if j != i]
            order = range(len(others)) if generator is None else torch.randperm(len(others), generator=generator).tolist()
            for k in order:
                g_j = grads[others[k]]
                dot = torch.dot(current, g_j)
                norm_sq = torch.dot(g_j, g_j)
                if dot < 0 and norm_sq > 1e-8:
                    current = current - (dot / norm_sq) * g_j
            projected.append(current.view_as(gradients[i]).to(gradients[i].dtype))
        return projected


def pcgrad(task_grads: Sequence[Tensor], generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's combined gradient ``Σ_i g_i^PC`` for flattened per-task gradients ``task_grads[i]`` [P]
    (`PCGradBalancer.project_conflicting_gradients`; the trainers pass a seeded ``generator``: random order)."""
    projected = PCGradBalancer.project_conflicting_gradients([g.double() for g in task_grads], generator)
    return torch.stack(projected).sum(0).to(task_grads[0].dtype)


def create_gradient_balancer(strategy: str, task_names: Sequence[str] | int = 2, device=None, **kwargs):
    """The balancer of ``strategy`` (None for "none"); kwargs: ``momentum`` / ``warmup_steps`` (loss_scale),
    ``alpha`` (gradnorm), ``initial_log_var`` (uncertainty). An unknown strategy is a `UserError` (a ValueError)."""
    if strategy == "none":
        return None
    if strategy == "loss_scale":
        return LossScaleBalancer(task_names, device, momentum=kwargs.get("momentum", 0.99),
                                 warmup_steps=kwargs.get("warmup_steps", 0))
    if strategy == "uncertainty":
        return UncertaintyBalancer(task_names, device, initial_log_var=kwargs.get("initial_log_var", 0.0))
    if strategy == "gradnorm":
        return GradNormBalancer(task_names, device, alpha=kwargs.get("alpha", 1.5))
    if strategy == "pcgrad":
        return PCGradBalancer(task_names, device)
    raise UserError(f"Unknown gradient balancing strategy {strategy!r}: craft_gradient_balancing must be one of "
                    f"{', '.join(STRATEGIES)}")


def make_balancer(strategy: str, num_tasks: int = 2, **kwargs):
    """The stateful balancer of ``craft_gradient_balancing`` (None for "none" and "pcgrad", which keep no state)."""
    balancer = create_gradient_balancer(strategy, num_tasks, **kwargs)
    return None if isinstance(balancer, PCGradBalancer) else balancer
