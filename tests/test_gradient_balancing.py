"""Gradient balancing: each strategy's weights against a hand-computed example; PCGrad against its formula."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from craft.balancing_step import BalancedScaler, GradientBalancing
from craft.errors import UserError
from craft.gradient_balancing import (
    GradNormBalancer,
    LossScaleBalancer,
    UncertaintyBalancer,
    make_balancer,
    pcgrad,
)


def test_loss_scale_divides_by_the_running_mean():
    balancer = LossScaleBalancer(2, momentum=0.5)
    assert balancer.weight(0) == 1.0  # nothing seen yet
    balancer.observe(0, 2.0)
    assert balancer.weight(0) == pytest.approx(0.5)  # m = 2
    balancer.observe(0, torch.tensor(4.0))
    assert balancer.weight(0) == pytest.approx(1 / 3)  # m = 0.5 * 2 + 0.5 * 4 = 3
    balancer.observe(0, float("nan"))  # ignored
    assert balancer.weight(0) == pytest.approx(1 / 3)
    balancer.observe(1, 0.25)
    assert balancer.weight(1) == pytest.approx(4.0)
    restored = LossScaleBalancer(2)
    restored.load_state_dict(balancer.state_dict())
    assert restored.weight(0) == pytest.approx(1 / 3) and restored.momentum == 0.5


def _set_log_variances(balancer, values):
    with torch.no_grad():
        for name, value in zip(balancer.task_names, values):
            balancer.log_vars[name].fill_(value)


def _log_variance_grads(balancer):
    return [float(balancer.log_vars[name].grad) if balancer.log_vars[name].grad is not None else 0.0
            for name in balancer.task_names]


def test_uncertainty_objective_and_gradients_by_hand():
    balancer = UncertaintyBalancer(2)
    _set_log_variances(balancer, [0.5, -0.2])
    losses = [torch.tensor(2.0), torch.tensor(0.7)]
    objective = balancer.objective(losses, [0.6, 0.4])
    expected = 0.6 * (math.exp(-0.5) * 2.0 + 0.5) + 0.4 * (math.exp(0.2) * 0.7 - 0.2)
    assert float(objective.detach()) == pytest.approx(expected, rel=1e-6)
    objective.backward()
    expected_grad = [0.6 * (1 - math.exp(-0.5) * 2.0), 0.4 * (1 - math.exp(0.2) * 0.7)]
    assert _log_variance_grads(balancer) == pytest.approx(expected_grad, rel=1e-6)
    assert float(balancer.weight(0).detach()) == pytest.approx(math.exp(-0.5))


def test_uncertainty_task_objective_sums_over_units():
    """A micro-batch holding `units` items: d/ds (exp(-s) loss + s units) = units - exp(-s) loss."""
    balancer = UncertaintyBalancer(2)
    term = balancer.task_objective(1, torch.tensor(6.0), units=3)
    term.backward()
    assert float(term.detach()) == pytest.approx(6.0)
    assert _log_variance_grads(balancer)[1] == pytest.approx(3 - 6.0)


def test_uncertainty_log_variances_converge_to_log_loss():
    balancer = UncertaintyBalancer(2)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    for _ in range(500):
        optimizer.zero_grad()
        balancer.objective([torch.tensor(3.0), torch.tensor(0.5)], [0.6, 0.4]).backward()
        optimizer.step()
    assert balancer.log_variance.tolist() == pytest.approx([math.log(3.0), math.log(0.5)], abs=1e-3)


def test_gradnorm_update_by_hand():
    balancer = GradNormBalancer(2, asymmetry=1.5, lr=0.1)
    # step 1: L(0) = L = [1, 1] -> r = [1, 1]; G = [2, 1]; Gbar = 1.5; target [1.5, 1.5];
    # grad = sign(G - target) * n = [2, -1]; w = [0.8, 1.1]; renormalised to sum 2: [1.6/1.9, 2.2/1.9]
    weights = balancer.update([1.0, 1.0], [2.0, 1.0])
    assert weights.tolist() == pytest.approx([1.6 / 1.9, 2.2 / 1.9], rel=1e-9)
    # step 2: L = [0.5, 0.9] -> relative [0.5, 0.9], r = [0.5/0.7, 0.9/0.7]; norms [2, 1]
    w = [1.6 / 1.9, 2.2 / 1.9]
    g = [w[0] * 2.0, w[1] * 1.0]
    mean_g = (g[0] + g[1]) / 2
    target = [mean_g * (0.5 / 0.7) ** 1.5, mean_g * (0.9 / 0.7) ** 1.5]
    new = [w[i] - 0.1 * math.copysign(1.0, g[i] - target[i]) * [2.0, 1.0][i] for i in range(2)]
    new = [2 * x / sum(new) for x in new]
    assert balancer.update([0.5, 0.9], [2.0, 1.0]).tolist() == pytest.approx(new, rel=1e-9)
    assert sum(balancer.weights.tolist()) == pytest.approx(2.0)
    restored = GradNormBalancer(2)
    restored.load_state_dict(balancer.state_dict())
    assert restored.weights.tolist() == balancer.weights.tolist()
    assert restored.initial_losses.tolist() == [1.0, 1.0]


def test_pcgrad_two_conflicting_tasks_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1 . g2 = -1 < 0: g1' = g1 - (-1 / 2) g2 = [0.5, 0.5]; g2' = g2 - (-1 / 1) g1 = [0, 1]
    assert pcgrad([g1, g2]).tolist() == pytest.approx([0.5, 1.5])
    projected_1 = torch.tensor([0.5, 0.5])
    assert float(projected_1 @ g2) == pytest.approx(0.0)  # the conflicting component is removed


def test_pcgrad_leaves_agreeing_tasks_alone():
    g1, g2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, -0.2])
    assert pcgrad([g1, g2]).tolist() == pytest.approx((g1 + g2).tolist())


def _project_in_order(grads, i, order):
    current = grads[i].double()
    for j in order:
        dot = current @ grads[j].double()
        if dot < 0:
            current = current - dot / (grads[j].double() @ grads[j].double()) * grads[j].double()
    return current


def test_pcgrad_three_tasks_matches_the_formula_for_some_random_order():
    grads = [torch.tensor(g, dtype=torch.float64) for g in ([1.0, 0.2, -0.5], [-0.8, 1.0, 0.1], [0.3, -1.0, 1.0])]
    result = pcgrad(grads, generator=torch.Generator().manual_seed(3))
    candidates = []
    for orders in itertools.product(*[list(itertools.permutations([j for j in range(3) if j != i]))
                                      for i in range(3)]):
        candidates.append(sum(_project_in_order(grads, i, order) for i, order in enumerate(orders)))
    distances = sorted(float((result - c).abs().max()) for c in candidates)
    assert distances[0] < 1e-12
    assert distances[-1] > 1e-3  # the order matters for these gradients: the check is not vacuous


def test_make_balancer():
    assert isinstance(make_balancer("loss_scale"), LossScaleBalancer)
    assert isinstance(make_balancer("uncertainty"), UncertaintyBalancer)
    assert isinstance(make_balancer("gradnorm"), GradNormBalancer)
    assert make_balancer("none") is None and make_balancer("pcgrad") is None
    with pytest.raises(UserError, match="craft_gradient_balancing"):
        make_balancer("magic")


# ------------------------------------------------------------------------------------- trainer-side controller


def _two_task_model():
    """shared -> (sft_head, con_head): the shared layer gets both tasks' gradients, each head one task's."""
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"shared": torch.nn.Linear(3, 4), "sft": torch.nn.Linear(4, 1),
                                "con": torch.nn.Linear(4, 1)})


def _task_losses(model, x):
    h = model["shared"](x)
    return model["sft"](h).pow(2).mean(), -model["con"](h).mean()


def _task_grads(model, x, weights):
    grads = []
    for task in range(2):
        model.zero_grad()
        (weights[task] * _task_losses(model, x)[task]).backward()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
    model.zero_grad()
    return grads


def test_controller_pcgrad_projects_only_shared_parameters():
    model = _two_task_model()
    params = list(model.parameters())
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    g_sft, g_con = _task_grads(model, x, [0.6, 0.4])
    balancing = GradientBalancing("pcgrad", alpha=0.6)
    for task in range(2):  # two micro-batches, one per task, collected like the trainer does
        (balancing.task_term(task, [0.6, 0.4][task], _task_losses(model, x)[task], 1)).backward()
        balancing.collect(params, task)
        assert all(p.grad is None for p in params)
    balancing.combine(params, {0: 1.0, 1: 1.0}, shared_layer=[0, 1])
    shared = [0, 1]  # shared.weight, shared.bias
    expected_shared = pcgrad([torch.cat([g_sft[i].flatten() for i in shared]),
                              torch.cat([g_con[i].flatten() for i in shared])])
    got_shared = torch.cat([params[i].grad.flatten() for i in shared])
    assert torch.allclose(got_shared, expected_shared, atol=1e-6)
    # the tasks conflict on the shared layer, so the projection changed something
    assert float(torch.cat([g_sft[i].flatten() for i in shared]) @ torch.cat([g_con[i].flatten() for i in shared])) < 0
    for i in range(2, len(params)):  # heads: one task each, summed unchanged
        assert torch.allclose(params[i].grad, g_sft[i] + g_con[i], atol=1e-7)


def test_controller_gradnorm_uses_unweighted_shared_layer_norms():
    model = _two_task_model()
    params = list(model.parameters())
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    balancing = GradientBalancing("gradnorm", alpha=0.6)
    unweighted = _task_grads(model, x, [1.0, 1.0])
    weighted = _task_grads(model, x, [0.6, 0.4])
    norms = [float(torch.cat([unweighted[t][i].flatten() for i in (0, 1)]).norm()) for t in range(2)]
    for task in range(2):
        balancing.task_term(task, [0.6, 0.4][task], _task_losses(model, x)[task], 1).backward()
        balancing.collect(params, task)
    balancing.combine(params, {0: 2.0, 1: 3.0}, shared_layer=[0, 1])
    reference = GradNormBalancer(2)
    reference.update([2.0, 3.0], norms)
    assert balancing.balancer.weights.tolist() == pytest.approx(reference.weights.tolist(), rel=1e-5)
    for i, param in enumerate(params):
        assert torch.allclose(param.grad, weighted[0][i] + weighted[1][i], atol=1e-6)
    assert balancing.effective_weights() == pytest.approx(
        {"sft": 0.6 * reference.weights[0].item(), "contrastive": 0.4 * reference.weights[1].item()})


def test_balanced_scaler_uncertainty_terms():
    from craft.accumulator import AccumulationScaler, WindowCounts

    balancing = GradientBalancing("uncertainty", alpha=0.6)
    _set_log_variances(balancing.module, [0.3, -0.1])
    scaler = BalancedScaler(AccumulationScaler(0.6, WindowCounts(sft_tokens=10, contrastive_terms=2)), balancing)
    token_sum, con = torch.tensor(25.0), torch.tensor(1.5)
    loss = scaler.micro_batch_loss(sft_token_sum=token_sum, contrastive_loss=con, sft_tokens=4)
    # 0.06 * (exp(-0.3) * 25 + 0.3 * 4) + 0.2 * (exp(0.1) * 1.5 - 0.1)
    expected = 0.06 * (math.exp(-0.3) * 25 + 0.3 * 4) + 0.2 * (math.exp(0.1) * 1.5 - 0.1)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(scaler.contrastive_weight().detach()) == pytest.approx(0.2 * math.exp(0.1), rel=1e-6)
    assert float(scaler.contrastive_regularizer().detach()) == pytest.approx(0.2 * -0.1, rel=1e-6)


def test_controller_loss_scale_updates_at_step_end_only():
    balancing = GradientBalancing("loss_scale", alpha=0.6)
    balancing.balancer.momentum = 0.5
    assert balancing.effective_weights() == {"sft": 0.6, "contrastive": pytest.approx(0.4)}
    balancing.end_step({0: 2.0, 1: 0.5})
    assert balancing.effective_weights() == pytest.approx({"sft": 0.3, "contrastive": 0.8})
    restored = GradientBalancing("loss_scale", alpha=0.6)
    restored.load_state_dict(balancing.state_dict())
    assert restored.effective_weights() == pytest.approx({"sft": 0.3, "contrastive": 0.8})
    with pytest.raises(UserError, match="craft_gradient_balancing='loss_scale'"):
        GradientBalancing("pcgrad", alpha=0.6).load_state_dict(balancing.state_dict())


# -------------------------------------------------------------------------------------------- in the trainer


def test_trainer_loss_scale_weights_follow_the_logged_losses(tmp_path):
    from craft_scale_helpers import craft_trainer

    trainer = craft_trainer(tmp_path, craft_gradient_balancing="loss_scale", gradient_accumulation_steps=2,
                            craft_beta=0.5, max_steps=2)
    trainer.train()
    first, second = [e for e in trainer.state.log_history if "balancing/craft_weight_sft" in e]
    assert first["balancing/craft_weight_sft"] == pytest.approx(0.6)  # lambda = 1 before any loss
    assert first["balancing/craft_weight_contrastive"] == pytest.approx(0.4)
    # after step 1 the running means are step 1's losses: lambda_i = 1 / L_i
    assert second["balancing/craft_weight_sft"] == pytest.approx(0.6 / first["loss/craft_sft"], rel=1e-5)
    assert second["balancing/craft_weight_contrastive"] == pytest.approx(0.4 / first["loss/craft_contrast"], rel=1e-5)


def test_trainer_uncertainty_log_variances_are_trained_and_saved(tmp_path):
    from craft_scale_helpers import craft_trainer

    trainer = craft_trainer(tmp_path, craft_gradient_balancing="uncertainty", gradient_accumulation_steps=2,
                            craft_beta=0.5, max_steps=3, learning_rate=0.1)
    trainer.train()
    s = trainer.craft_modules.balancing.log_variance.detach()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in trainer.craft_modules.balancing.log_vars.values())
    assert float(s.abs().min()) > 0  # both moved away from 0
    last = [e for e in trainer.state.log_history if "balancing/craft_weight_sft" in e][-1]
    assert {"balancing.log_vars.sft", "balancing.log_vars.contrastive"} <= set(trainer.craft_state_dict()["modules"])
    assert last["balancing/craft_weight_sft"] > 0


def test_trainer_pcgrad_step_equals_the_formula_on_shared_parameters(tmp_path):
    from craft_scale_helpers import craft_trainer, step_gradients, trainable, window

    batches = window(["sft", "contrastive"])
    balanced = craft_trainer(tmp_path, craft_gradient_balancing="pcgrad", gradient_accumulation_steps=2)
    got = step_gradients(balanced, [dict(b) for b in batches])
    plain = craft_trainer(tmp_path, gradient_accumulation_steps=2)
    plain.model.zero_grad(set_to_none=True)
    micro_batches, num_items = plain.get_batch_samples(iter([dict(b) for b in batches]), 2, plain.args.device)
    plain.current_gradient_accumulation_steps = 2
    task_grads = []
    for batch in micro_batches:  # the same window weights, one task at a time
        plain.training_step(plain.model, batch, num_items)
        task_grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainable(plain)])
        for p in trainable(plain):
            p.grad = None
    g_sft, g_con = task_grads
    shared = [i for i in range(len(got)) if bool(g_sft[i].any()) and bool(g_con[i].any())]
    assert 0 < len(shared) < len(got)  # the LM head is SFT-only, the projection head contrastive-only
    flat_sft = torch.cat([g_sft[i].flatten() for i in shared])
    flat_con = torch.cat([g_con[i].flatten() for i in shared])
    expected = pcgrad([flat_sft, flat_con])
    assert torch.allclose(torch.cat([got[i].flatten() for i in shared]), expected, atol=1e-6)
    for i in set(range(len(got))) - set(shared):
        assert torch.allclose(got[i], g_sft[i] + g_con[i], atol=1e-7)
    conflict = float(flat_sft @ flat_con) < 0
    assert conflict == (not torch.allclose(expected, flat_sft + flat_con))


def test_trainer_gradnorm_updates_weights_from_the_last_decoder_layer(tmp_path):
    from craft_scale_helpers import craft_trainer

    trainer = craft_trainer(tmp_path, craft_gradient_balancing="gradnorm", gradient_accumulation_steps=2,
                            craft_beta=0.5, max_steps=2)
    params = trainer._craft_trainable_parameters()
    last_layer = {id(p) for p in trainer.model.model.layers[-1].parameters()}
    assert {id(params[i]) for i in trainer._craft_last_layer_indices(params)} == last_layer
    trainer.train()
    first, second = [e for e in trainer.state.log_history if "balancing/craft_weight_sft" in e]
    assert (first["balancing/craft_weight_sft"], first["balancing/craft_weight_contrastive"]) == pytest.approx((0.6, 0.4))
    weights = trainer.craft_balancing.balancer.weights
    assert float(weights.sum()) == pytest.approx(2.0) and not torch.allclose(weights, torch.ones_like(weights))
    # step 2 ran with the weights of the update after step 1; its own update followed
    assert second["balancing/craft_weight_sft"] != pytest.approx(0.6)
