"""One training step of every target-propagation rule changes each weight by its documented update.

The references are computed here, independently of the library's closed forms: autograd on the local losses
``mean_b 1/2 ||s_i(W_i h_{i-1} + b_i) - h^_i||^2`` (eq. 4.12) with plain torch activations, the modified rules'
``D^{-1}`` from an autograd derivative of the activation, the batch-normalised input from ``torch.var``, and the
feedback losses of Alg. A.8 / A.9 (and of DRL, DDTP-linear, L-DRL, as written in ``tests/rules/test_drl.py``) by autograd
with the noise redrawn from the rule's seed. The targets ``h^_i`` come
from ``compute_targets`` (their maps are checked against closed forms in the target-map tests).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
import tplightning as tp
from conftest import RULES, TP_RULES, OneBatch, make_rule, quiet_trainer
from rules.test_drl import reference_loss

LR, LR_FB, B = 0.01, 0.02, 8
SIZES = (5, 6, 6, 6)


def act(name):
    return {"leaky_relu": lambda a: torch.nn.functional.leaky_relu(a, 0.35), "linear": lambda a: a}[name]


def acts(rule):
    return [act("leaky_relu")] * (rule.num_layers - 1) + [act("linear")]


def _build(name):
    lr = RULES[name][1].get("forward_optimizer", functools.partial(torch.optim.SGD, lr=LR)).keywords["lr"]
    kw = {"forward_optimizer": functools.partial(torch.optim.SGD, lr=lr)}
    if issubclass(RULES[name][0], tp.LearnedInverseRule):
        kw["feedback_optimizer"] = functools.partial(torch.optim.SGD, lr=LR_FB)
    torch.manual_seed(0)
    return make_rule(name, sizes=SIZES, **kw), lr


def _layer_inputs(rule, hs):
    """What each layer received: ``h_{i-1}``, or for batch-norm rules ``(h - mean) / sqrt(var + eps)`` over the batch."""
    if not rule.batch_norm:
        return hs[:-1]
    return [(h - h.mean(0)) / (h.var(0, unbiased=False) + rule.bn_eps).sqrt() for h in hs[:-1]]


def _expected_forward(rule, lr, x, y, layers):
    """``{layer: (W_new, b_new)}`` by autograd on the local losses (``D^{-1}`` for modified rules)."""
    with torch.no_grad():
        hs, targets = rule.compute_targets(x, y)
    inputs, out = _layer_inputs(rule, hs), {}
    for i in layers:
        layer = rule.net.layers[i - 1]
        W = layer.full_weight().detach().clone().requires_grad_(True)
        h_in, h_hat, s = inputs[i - 1].detach(), targets[i - 1].detach(), acts(rule)[i - 1]
        a = h_in @ W.T
        if rule.scaling is tp.losses.D_INVERSE:
            a_ = a.detach().requires_grad_(True)
            D = torch.autograd.grad(s(a_).sum(), a_)[0]
            grad = ((s(a.detach()) - h_hat) / D).T @ h_in / len(h_in)
        else:
            grad = torch.autograd.grad(0.5 * (s(a) - h_hat).pow(2).sum(1).mean(), W)[0]
        out[i] = (W.detach() - lr * grad)[: layer.weight.shape[0]]
    return out


def _expected_feedback(rule, x, W_after):
    """``{map index: Q_new}`` by autograd on Alg. A.8 (thesis form) or A.9 (original form) with the rule's noise."""
    gen = torch.Generator().manual_seed(rule.feedback_seed)
    with torch.no_grad():
        hs, _ = rule.forward_pass(x, update_state=False)
    out = {}
    for i in rule.feedback_layers:
        Q = rule.Q(i).detach().clone().requires_grad_(True)
        W, s_i, s_next = W_after[i], acts(rule)[i - 1], acts(rule)[i]
        if issubclass(rule.feedback_map, tp.target_maps.ThesisInverse):
            h = rule.feedback_noise_std * torch.randn(B, Q.shape[0], generator=gen)
            loss = 0.5 * ((h @ W.T) @ Q.T - h).pow(2).sum(1).mean()  # g(f(h)) = Q s^-1(s(W h)) = Q W h
        else:
            h = hs[i] + rule.feedback_noise_std * torch.randn(hs[i].shape, generator=gen)
            loss = 0.5 * (s_i(s_next(h @ W.T) @ Q.T) - h).pow(2).sum(1).mean()
        out[i] = Q.detach() - LR_FB * torch.autograd.grad(loss, Q)[0]
    return out


def _expected_drl_feedback(before, after, x):
    """``{map index: Q_new}`` for DRL, DDTP-linear and L-DRL: autograd on their documented losses at the forward pass of
    the *updated* layers (they read a fresh pass after the forward update), the maps' noise redrawn in map order."""
    gen = torch.Generator().manual_seed(before.feedback_seed)
    Ws, s = [layer.full_weight().detach() for layer in after.net.layers], acts(before)
    hs = [x]
    for W, f in zip(Ws, s):
        hs.append(f(hs[-1] @ W.T))
    Qs = {i: before.Q(i).detach() for i in before.feedback_layers}
    out = {}
    for i in before.feedback_layers:
        shapes = [hs[i].shape, hs[i + 1].shape] if isinstance(before, tp.LDRL) else [hs[i].shape]
        draws = [before.feedback_noise_std * torch.randn(shape, generator=gen) for shape in shapes]
        Q = Qs[i].clone().requires_grad_(True)
        out[i] = Q.detach() - LR_FB * torch.autograd.grad(reference_loss(before, i, {**Qs, i: Q}, Ws, s, hs, draws), Q)[0]
    return out


@pytest.mark.parametrize("name", TP_RULES)
def test_one_step_changes_every_weight_by_its_documented_update(name):
    rule, lr = _build(name)
    x, y = torch.randn(B, SIZES[0]), torch.randn(B, SIZES[-1])
    before = [layer.full_weight().detach().clone() for layer in rule.net.layers]
    pre_step = copy.deepcopy(rule)  # the feedback reference needs the step's forward pass
    expected = _expected_forward(rule, lr, x, y, range(1, rule.num_layers + 1))
    quiet_trainer(max_epochs=1).fit(rule, datamodule=OneBatch(x, y))
    updated = [rule.last_layer] if isinstance(rule.selection, tp.selection.RandomLayer) else list(range(1, rule.num_layers + 1))
    for i, layer in enumerate(rule.net.layers, start=1):
        if i in updated:
            torch.testing.assert_close(layer.weight, expected[i], rtol=1e-4, atol=1e-6, msg=f"{name} layer {i}")
            assert not torch.equal(layer.weight, before[i - 1][: layer.weight.shape[0]])
        else:  # a randomized rule changes exactly one forward layer
            assert torch.equal(layer.full_weight(), before[i - 1]), f"{name}: layer {i} changed, drawn {rule.last_layer}"
    if isinstance(rule, tp.ExactInverseRule):  # the kept inverses follow their weights
        for i in range(2, rule.num_layers + 1):
            torch.testing.assert_close(rule.inverse(i).double(), torch.linalg.inv(rule.net.weights[i - 1].double()), rtol=1e-4, atol=1e-5)
    if getattr(rule, "feedback_layers", None):
        W_after = {i: rule.net.layers[i].full_weight().detach() for i in rule.feedback_layers}
        drl = isinstance(rule, (tp.DRL, tp.DDTPLinear, tp.LDRL))
        for i, Q_new in (_expected_drl_feedback(pre_step, rule, x) if drl else _expected_feedback(pre_step, x, W_after)).items():
            torch.testing.assert_close(rule.Q(i), Q_new, rtol=1e-4, atol=1e-6, msg=f"{name} Q_{i}")


def test_modified_rules_divide_by_the_derivative():
    """RMTP-EI's update is ``D^{-1} (h - h^) h^T``: with leaky-ReLU 0.35, negative units move 1/0.35^2 times
    further than under TP-EI's ``D (h - h^) h^T`` for the same targets."""
    rule = make_rule("RMTPEI", sizes=(6, 6, 6))
    x, y = torch.randn(B, 6), torch.randn(B, 6)
    hs, targets = rule.compute_targets(x, y)
    pre = rule.forward_pass(x)[1]
    g_mod = rule.net.layers[0].local_grads(hs[0], pre[0], hs[1], targets[0], tp.losses.D_INVERSE)[rule.net.weights[0]]
    g_tp = rule.net.layers[0].local_grads(hs[0], pre[0], hs[1], targets[0], tp.losses.D)[rule.net.weights[0]]
    neg = (pre[0] < 0).float()
    e = hs[1] - targets[0]
    torch.testing.assert_close(g_mod, ((e * (neg / 0.35 + (1 - neg))).T @ x) / B)
    torch.testing.assert_close(g_tp, ((e * (neg * 0.35 + (1 - neg))).T @ x) / B)


def test_aosdtp_auxiliary_weights_never_change():
    rule = make_rule("AOSDTP", sizes=(6, 8, 8, 4), forward_optimizer=functools.partial(torch.optim.AdamW, lr=0.01, weight_decay=0.5))
    aux = rule.net.layers[-1].aux_weight.clone()
    assert aux.shape == (2, 8)  # the registry's aux_units=2
    quiet_trainer(max_epochs=2).fit(rule, datamodule=OneBatch(torch.randn(16, 6), torch.randn(16, 4)))
    assert torch.equal(rule.net.layers[-1].aux_weight, aux)
    assert "aux_weight" not in dict(rule.named_parameters())


def test_schedule_waits_for_feedback_pretraining():
    """During the pre-training epochs only ``Q`` learns and the learning rates stay at their initial values."""
    rule = make_rule("DTPAI", sizes=(6, 6, 6), feedback_pretrain_epochs=2, lr_final_factor=0.2)
    seen = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append(([o.param_groups[0]["lr"] for o in module.optimizer_list()], [W.detach().clone() for W in module.forward_weights]))

    W0 = [W.detach().clone() for W in rule.forward_weights]
    Q0 = rule.Q(1).detach().clone()
    quiet_trainer(max_epochs=4, callbacks=[Record()]).fit(rule, datamodule=OneBatch(torch.randn(8, 6), torch.randn(8, 6)))
    (lrs0, W_0), (lrs1, W_1), (lrs2, _), (lrs3, W_3) = seen
    assert lrs0 == lrs1 == lrs2 == [0.01, 0.01]  # recorded before the epoch's scheduler step: epochs 0, 1 pretrain
    assert all(torch.equal(a, b) for a, b in zip(W0, W_1)) and not torch.equal(rule.Q(1), Q0)
    assert lrs3[0] < 0.01 and not all(torch.equal(a, b) for a, b in zip(W_1, W_3))


def test_dtpei_trains_like_tpei_up_to_float_error():
    """Thesis 4.3.3: difference targets cancel reconstruction errors; an exact inverse has none, so DTP-EI's targets
    and therefore its training equal TP-EI's up to round-off."""
    runs = {}
    for name in ("TPEI", "DTPEI"):
        torch.manual_seed(0)
        rule = make_rule(name, sizes=(6, 6, 6, 6))
        x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(3)), torch.randn(16, 6, generator=torch.Generator().manual_seed(4))
        hs, targets = rule.compute_targets(x, y)
        quiet_trainer(max_epochs=5).fit(rule, datamodule=OneBatch(x, y))
        runs[name] = targets, [W.detach() for W in rule.forward_weights]
    for a, b in zip(runs["TPEI"][0], runs["DTPEI"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(runs["TPEI"][1], runs["DTPEI"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert isinstance(make_rule("DTPEI").maps[0], tp.target_maps.Difference)
