"""Math tests of the exact-inverse rules TP-EI, RTP-EI, RMTP-EI (thesis 4.1-4.2, Alg. 4.1, A.4-A.6).

Expected values come from independent computations: forward passes and inverse non-linearities
written here, ``torch.linalg.inv``, autograd gradients and Jacobians. All math runs in float64:
the rules are built, cast with ``.double()`` and their inverse buffers refreshed at float64.
"""
from __future__ import annotations

import math

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
import tplightning
from tplightning import RMTPEI, RTPEI, TPEI
from tplightning import functional as F

DT = torch.float64
LR = 0.01


def sgd(params):
    return torch.optim.SGD(params, lr=LR)


def make(cls=TPEI, seed=0, sizes=(6, 6, 6), **kw):
    """A rule at float64 with exact float64 inverses."""
    torch.manual_seed(seed)
    kw.setdefault("forward_optimizer", sgd)
    rule = cls(sizes=list(sizes), **kw).double()
    rule.refresh_inverses()
    return rule


def weights(rule) -> list[torch.Tensor]:
    return [W.detach().clone() for W in rule.forward_weights]


# --------------------------------------------------------------------------------------------
# Independent re-implementations of the pieces of the thesis' equations
# --------------------------------------------------------------------------------------------


def act_fn(name: str, slope: float = 0.35):
    if name == "leaky_relu":
        return lambda a: torch.where(a >= 0, a, slope * a)
    if name == "tanh":
        return torch.tanh
    return lambda a: a


def act_inv(name: str, slope: float = 0.35):
    if name == "leaky_relu":
        return lambda h: torch.where(h >= 0, h, h / slope)
    if name == "tanh":
        return torch.atanh
    return lambda h: h


def act_deriv(name: str, slope: float = 0.35):
    if name == "leaky_relu":
        return lambda a: torch.where(a >= 0, torch.ones_like(a), torch.full_like(a, slope))
    if name == "tanh":
        return lambda a: 1 - torch.tanh(a) ** 2
    return torch.ones_like


def names(L: int, hidden: str, out: str = "linear") -> list[str]:
    return [hidden] * (L - 1) + [out]


def forward(Ws, acts, x):
    """``([h_0..h_L], [a_1..a_L])`` of eq. 4.1, batched: ``h_i = s_i(h_{i-1} W_i^T)``."""
    hs, pre = [x], []
    for W, name in zip(Ws, acts):
        pre.append(hs[-1] @ W.T)
        hs.append(act_fn(name)(pre[-1]))
    return hs, pre


def output_error(h_L, y, loss="mse"):
    if loss == "mse":
        return h_L - y
    return torch.softmax(h_L, -1) - torch.nn.functional.one_hot(y.long(), h_L.shape[-1]).to(h_L.dtype)


def exact_targets(Ws, acts, x, y, eta_hat, loss="mse"):
    """Eqs. 4.4 and 4.16 with ``torch.linalg.inv``: ``h^_i = W_{i+1}^{-1} s_{i+1}^{-1}(h^_{i+1})``."""
    hs, _ = forward(Ws, acts, x)
    L = len(Ws)
    targets = [None] * L
    targets[L - 1] = hs[-1] - eta_hat * output_error(hs[-1], y, loss)
    for i in range(L - 1, 0, -1):  # h^_i from h^_{i+1}, layer i+1 has weights Ws[i]
        targets[i - 1] = act_inv(acts[i])(targets[i]) @ torch.linalg.inv(Ws[i]).T
    return hs, targets


def tail(Ws, acts, i):
    """``h_i -> h_L`` through layers ``i+1..L`` for one sample (1-D)."""

    def f(h):
        for W, name in zip(Ws[i:], acts[i:]):
            h = act_fn(name)(W @ h)
        return h

    return f


def bp_grads(Ws, acts, x, y):
    """Autograd gradients of ``mean_b 1/2||h_L - y||^2`` w.r.t. every ``W_i``."""
    Wr = [W.clone().requires_grad_(True) for W in Ws]
    h = x
    for W, name in zip(Wr, acts):
        h = act_fn(name)(h @ W.T)
    loss = (0.5 * ((h - y) ** 2).sum(-1)).mean()
    return list(torch.autograd.grad(loss, Wr))


def local_grad(d, h, h_hat, h_prev):
    """``(1/B) sum_b D_b (h_b - h^_b) h_{b,prev}^T`` (eq. 4.12) written as a loop."""
    B = h.shape[0]
    return sum(torch.outer(d[b] * (h[b] - h_hat[b]), h_prev[b]) for b in range(B)) / B


def cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


# ============================================================================================
# Targets (eq. 4.16)
# ============================================================================================


@pytest.mark.parametrize(
    "sizes, hidden, loss, eta_hat",
    [
        ((6, 6, 6), "leaky_relu", "mse", 0.1),
        ((6, 6, 6), "leaky_relu", "cross_entropy", 0.1),
        ((4, 6, 6, 6), "leaky_relu", "mse", 0.1),
        ((3, 5, 5, 5, 5), "leaky_relu", "mse", 0.1),
        ((4, 6, 6, 6), "tanh", "mse", 1e-3),  # small step: tanh targets stay inside (-1, 1)
    ],
)
@pytest.mark.parametrize("seed", range(5))
def test_tpei_targets_are_exact_inverses(sizes, hidden, loss, eta_hat, seed):
    rule = make(TPEI, seed, sizes, activation=hidden, negative_slope=0.35, loss=loss, target_stepsize=eta_hat)
    L = len(sizes) - 1
    acts = names(L, hidden)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, sizes[0], generator=g, dtype=DT)
    y = torch.randn(5, sizes[-1], generator=g, dtype=DT) if loss == "mse" else torch.randint(sizes[-1], (5,), generator=g)
    hs, targets = rule.compute_targets(x, y)
    hs_exp, targets_exp = exact_targets(weights(rule), acts, x, y, eta_hat, loss)
    assert all(bool(torch.isfinite(t).all()) for t in targets_exp)
    assert len(hs) == L + 1 and len(targets) == L
    for h, h_exp in zip(hs, hs_exp):
        torch.testing.assert_close(h, h_exp, rtol=1e-13, atol=1e-13)
    for i in range(L):
        assert targets[i].shape == (5, sizes[i + 1])
        torch.testing.assert_close(targets[i], targets_exp[i], rtol=1e-10, atol=1e-11)
    # the target maps really invert the forward layers: f_{i+1}(h^_i) = h^_{i+1}
    Ws = weights(rule)
    for i in range(1, L):
        torch.testing.assert_close(act_fn(acts[i])(targets[i - 1] @ Ws[i].T), targets[i], rtol=1e-9, atol=1e-10)


def test_compute_targets_changes_no_weight():
    rule = make(TPEI, 3, (6, 6, 6))
    before = weights(rule) + [rule.inverse(2).clone()]
    x = torch.randn(4, 6, dtype=DT)
    rule.compute_targets(x, torch.randn(4, 6, dtype=DT))
    for a, b in zip(before, weights(rule) + [rule.inverse(2)]):
        assert torch.equal(a, b)


def test_double_cast_and_inverse_buffers():
    """``.double()`` casts the inverse buffers too; ``refresh_inverses`` makes them float64-exact."""
    torch.manual_seed(0)
    rule = TPEI(sizes=[4, 6, 6, 6], forward_optimizer=sgd)
    assert rule.inverse(2).dtype == torch.float32
    rule = rule.double()
    for i in (2, 3):
        assert rule.inverse(i).dtype == DT and rule.forward_weights[i - 1].dtype == DT
    rule.refresh_inverses()
    for i in (2, 3):
        W = rule.forward_weights[i - 1].detach()
        torch.testing.assert_close(rule.inverse(i), torch.linalg.inv(W), rtol=1e-13, atol=1e-13)
        assert F.is_robustly_invertible(W, 0.4)  # robust initialisation (section 4.2.3)
    assert max(float(e.detach()) for e in rule.inverse_errors()) < 1e-13


# ============================================================================================
# Theorem 4.1 (descent direction) -- see the erratum test below
# ============================================================================================


def tp_and_bp(rule, acts, x, y, eta_hat):
    """TP-EI updates (local_update on the rule's targets, normalised by eta_hat) and BP gradients."""
    rule.target_stepsize = eta_hat
    hs, targets = rule.compute_targets(x, y)
    Ws = weights(rule)
    _, pre = forward(Ws, acts, x)
    tp = [
        F.local_update(act_deriv(acts[i - 1])(pre[i - 1]), hs[i], targets[i - 1], hs[i - 1]) / eta_hat
        for i in range(1, len(Ws) + 1)
    ]
    return tp, bp_grads(Ws, acts, x, y), hs, pre


def first_order_tp(Ws, acts, hs, pre, y, i):
    """The eta_hat -> 0 limit of the TP update of layer i: ``D_i J_i^{-1} e_L h_{i-1}^T`` (eq. B.3)."""
    e = (hs[-1] - y)[0]
    J = torch.autograd.functional.jacobian(tail(Ws, acts, i), hs[i][0])
    d = act_deriv(acts[i - 1])(pre[i - 1])[0]
    return torch.outer(d * torch.linalg.solve(J, e), hs[i - 1][0]), J, d, e


@pytest.mark.parametrize("sizes, hidden", [((6, 6, 6), "leaky_relu"), ((4, 6, 6, 6), "leaky_relu"), ((6, 6, 6, 6), "tanh")])
def test_theorem_4_1_tp_update_limit_and_sign(sizes, hidden):
    """For eta_hat -> 0 the TP-EI update is ``eta_hat D_i J_i^{-1} e h^T`` (eq. B.3), so its inner product with
    the BP gradient ``D_i J_i^T e h^T`` has the sign of ``q = e^T J D_i^2 J^{-1} e`` (eq. B.5).

    Over 50 random networks (batch size 1): the TP direction matches that limit, the sign of the
    cosine with BP is the sign of the independently computed ``q``, the output layer always has
    cosine 1, and the cosine is positive for the large majority of hidden layers.
    """
    L = len(sizes) - 1
    acts = names(L, hidden)
    positive = total = 0
    for seed in range(50):
        rule = make(TPEI, seed, sizes, activation=hidden)
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(1, sizes[0], generator=g, dtype=DT)
        y = torch.randn(1, sizes[-1], generator=g, dtype=DT)
        tp, bp, hs, pre = tp_and_bp(rule, acts, x, y, 1e-6)
        Ws = weights(rule)
        assert cos(tp[-1], bp[-1]) > 1 - 1e-9  # output layer: identical directions
        for i in range(1, L):
            limit, J, d, e = first_order_tp(Ws, acts, hs, pre, y, i)
            torch.testing.assert_close(tp[i - 1], limit, rtol=1e-4, atol=1e-4 * float(limit.abs().max()))
            q = float(e @ J @ (d**2 * torch.linalg.solve(J, e)))
            c = cos(tp[i - 1], bp[i - 1])
            # the exact limit cosine, from the closed forms
            bp_closed = torch.outer(d * (J.T @ e), hs[i - 1][0])
            torch.testing.assert_close(bp[i - 1], bp_closed, rtol=1e-10, atol=1e-12)
            assert math.isclose(c, cos(limit, bp_closed), rel_tol=1e-4, abs_tol=1e-5)
            if abs(q) > 1e-6 * float(e.norm() ** 2):
                assert (c > 0) == (q > 0)
            positive += int(c > 0)
            total += 1
    assert positive >= 0.85 * total


@pytest.mark.parametrize("seed", range(10))
def test_theorem_4_1_holds_on_average_over_error_directions(seed):
    """What survives of theorem 4.1: ``J D^2 J^{-1}`` is similar to ``D^2``, so its *trace* is ``tr(D^2) > 0``.

    Summing the eta_hat-normalised inner product ``<Delta W^tp, Delta W^bp>`` over an orthonormal basis
    of output errors ``e_L`` gives exactly ``||h_{i-1}||^2 tr(D_i^2)`` (eq. B.5): TP-EI is a descent
    direction on average over isotropic errors.
    """
    sizes, acts = (4, 6, 6, 6), names(3, "leaky_relu")
    rule = make(TPEI, seed, sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, generator=g, dtype=DT)
    Ws = weights(rule)
    hs, pre = forward(Ws, acts, x)
    for i in (1, 2):
        total = 0.0
        for k in range(6):
            y = hs[-1] - torch.eye(6, dtype=DT)[k]  # e_L = h_L - y = k-th basis vector
            tp, bp, _, _ = tp_and_bp(rule, acts, x, y, 1e-7)
            total += float((tp[i - 1] * bp[i - 1]).sum())
        d = act_deriv(acts[i - 1])(pre[i - 1])[0]
        expected = float(hs[i - 1][0].norm() ** 2 * (d**2).sum())
        assert math.isclose(total, expected, rel_tol=1e-4)


def test_theorem_4_1_linear_network_always_descends():
    """With ``D_i = I`` the proof of theorem 4.1 is right: ``<tp, bp> = ||e||^2 ||h||^2 > 0``."""
    sizes = (6, 6, 6, 6)
    acts = names(3, "linear")
    for seed in range(30):
        rule = make(TPEI, seed, sizes, activation="linear")
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(1, 6, generator=g, dtype=DT), torch.randn(1, 6, generator=g, dtype=DT)
        tp, bp, hs, _ = tp_and_bp(rule, acts, x, y, 1e-6)
        e = hs[-1] - y
        for i in (1, 2, 3):
            inner = float((tp[i - 1] * bp[i - 1]).sum())
            assert math.isclose(inner, float(e.norm() ** 2 * hs[i - 1].norm() ** 2), rel_tol=1e-5)


def test_theorem_4_1_counterexample():
    """Erratum: theorem 4.1 does not hold in general. Its proof (eq. B.6) treats ``J D^2 J^{-1}``, a matrix
    *similar* to the positive diagonal ``D^2``, as positive definite, but a non-symmetric matrix with
    positive eigenvalues can have ``e^T M e < 0``.

    Network 2-2-2, leaky-ReLU 0.35, linear output, ``W_1 = I``, ``W_2 = [[1, 10], [0, 1]]``,
    ``x = (1, -1)`` (so ``D_1 = diag(1, 0.35)``), ``e_L = (1, 1)``:
    ``e^T W_2 D_1^2 W_2^{-1} e = 1 + 10 (0.1225 - 1) + 0.1225 = -7.6525 < 0``.
    """
    rule = make(TPEI, 0, (2, 2, 2), target_stepsize=1e-6)
    W1 = torch.eye(2, dtype=DT)
    W2 = torch.tensor([[1.0, 10.0], [0.0, 1.0]], dtype=DT)
    rule.load_forward_weights([W1, W2])
    acts = names(2, "leaky_relu")
    x = torch.tensor([[1.0, -1.0]], dtype=DT)
    h2 = forward([W1, W2], acts, x)[0][-1]
    y = h2 - torch.tensor([[1.0, 1.0]], dtype=DT)
    tp, bp, _, _ = tp_and_bp(rule, acts, x, y, 1e-6)
    D2 = torch.diag(torch.tensor([1.0, 0.35**2], dtype=DT))
    e = torch.ones(2, dtype=DT)
    q = float(e @ W2 @ D2 @ torch.linalg.inv(W2) @ e)
    assert math.isclose(q, 1 + 10 * (0.1225 - 1) + 0.1225, rel_tol=1e-12)
    # <tp, bp> = ||h_0||^2 q (eq. B.5 with J = W_2)
    assert math.isclose(float((tp[0] * bp[0]).sum()), float(x.norm() ** 2) * q, rel_tol=1e-5)
    assert cos(tp[0], bp[0]) < -0.1  # the TP update of layer 1 is an ascent direction
    assert cos(tp[1], bp[1]) > 1 - 1e-9


# ============================================================================================
# Theorem 4.3: TP-EI targets are block Gauss-Newton targets up to O(eta_hat^2)
# ============================================================================================


def gn_errors(rule, acts, x, y, etas):
    """``||h^_i^{TP} - (h_i - eta J_i^{-1} e_L)||`` per hidden layer i and eta (eqs. 4.57, 4.59)."""
    Ws = weights(rule)
    hs, _ = forward(Ws, acts, x)
    e = (hs[-1] - y)[0]
    L = len(Ws)
    steps = {i: torch.linalg.solve(torch.autograd.functional.jacobian(tail(Ws, acts, i), hs[i][0]), e) for i in range(1, L)}
    errs = {i: [] for i in range(1, L)}
    for eta in etas:
        rule.target_stepsize = eta
        _, targets = rule.compute_targets(x, y)
        for i in range(1, L):
            errs[i].append(float((targets[i - 1][0] - (hs[i][0] - eta * steps[i])).norm()))
    return errs, steps


@pytest.mark.parametrize("sizes, out", [((6, 6, 6), "tanh"), ((4, 6, 6, 6), "linear"), ((6, 6, 6, 6, 6), "linear")])
def test_theorem_4_3_gauss_newton_targets_second_order(sizes, out):
    """Tanh hidden layers: the error against the block Gauss-Newton target scales as eta_hat^2.

    With a linear output the last hidden layer's target ``W_L^{-1}(h_L - eta e)`` is exactly linear in
    eta (error at round-off), so the slope is fitted on the layers below it (or on all layers with a
    tanh output).
    """
    L = len(sizes) - 1
    acts = names(L, "tanh", out)
    etas = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4]
    log_eta = torch.log(torch.tensor(etas, dtype=DT))
    design = torch.stack([log_eta, torch.ones_like(log_eta)], 1)
    for seed in range(8):
        rule = make(TPEI, seed, sizes, activation="tanh", output_activation=out)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, sizes[0], generator=g, dtype=DT)
        y = torch.randn(1, sizes[-1], generator=g, dtype=DT) * (0.3 if out == "tanh" else 1.0)
        errs, steps = gn_errors(rule, acts, x, y, etas)
        for i in range(1, L):
            err = torch.tensor(errs[i], dtype=DT)
            assert bool(torch.isfinite(err).all())
            if out == "linear" and i == L - 1:
                assert float(err.max()) < 1e-12 * float(steps[i].norm()) + 1e-14
                continue
            slope = float(torch.linalg.lstsq(design, err.log()[:, None]).solution[0])
            assert abs(slope - 2) < 0.3, (seed, i, errs[i])
            # and at the smallest eta the error is far below the first-order step eta * ||J^{-1} e||
            assert float(err[-1]) < 1e-2 * 1e-4 * float(steps[i].norm())


def test_theorem_4_3_piecewise_linear_is_exact():
    """With leaky-ReLU and a linear output, small targets cross no kink: TP-EI *is* the GN target."""
    sizes = (4, 6, 6, 6)
    acts = names(3, "leaky_relu")
    for seed in range(10):
        rule = make(TPEI, seed, sizes)
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(1, 4, generator=g, dtype=DT), torch.randn(1, 6, generator=g, dtype=DT)
        errs, steps = gn_errors(rule, acts, x, y, [1e-4])
        for i in (1, 2):
            assert errs[i][0] < 1e-10 * 1e-4 * float(steps[i].norm()) + 1e-14


# ============================================================================================
# Training steps (Lightning), checked step by step against Alg. 4.1 / A.4-A.6
# ============================================================================================


class Recorder(pl.Callback):
    """Snapshots weights and inverses around every training batch."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = (weights(module), {i: module.inverse(i).clone() for i in range(2, module.num_layers + 1)})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        after = (weights(module), {i: module.inverse(i).clone() for i in range(2, module.num_layers + 1)})
        x, y = batch
        self.steps.append({"before": self._before, "after": after, "x": x.clone(), "y": y.clone(), "layer": module.last_layer})


def fit(rule, sizes, num_train, batch_size, seed=0):
    dm = tplightning.StudentTeacherDataModule(sizes=list(sizes), num_train=num_train, batch_size=batch_size, teacher_seed=seed)
    rec = Recorder()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        precision="64-true",
        callbacks=[rec],
    )
    trainer.fit(rule, dm)
    assert len(rec.steps) == math.ceil(num_train / batch_size)
    return rec.steps


def alg_4_1(W, u, v, eps):
    """Alg. 4.1 written out (forward matrix only) and the branch taken."""
    d = float(v @ torch.linalg.inv(W) @ u)
    if abs(1 + d) >= eps:
        return W + torch.outer(u, v), False
    return W + torch.outer(u, v) / (eps - d), True


def test_rtpei_changes_exactly_one_layer_per_step():
    sizes = (6, 6, 6, 6)
    rule = make(RTPEI, 1, sizes, lr_final_factor=1.0, layer_seed=3)
    steps = fit(rule, sizes, num_train=15, batch_size=1)
    drawn = set()
    for st in steps:
        (W_before, inv_before), (W_after, inv_after) = st["before"], st["after"]
        changed = {i for i, (a, b) in enumerate(zip(W_before, W_after), start=1) if not torch.equal(a, b)}
        assert changed == {st["layer"]}
        drawn.add(st["layer"])
        for i in inv_before:  # only the drawn layer's inverse moves, and it stays exact
            assert torch.equal(inv_before[i], inv_after[i]) == (i != st["layer"])
            torch.testing.assert_close(inv_after[i], torch.linalg.inv(W_after[i - 1]), rtol=1e-11, atol=1e-12)
    assert drawn == {1, 2, 3}


@pytest.mark.parametrize("threshold, expect_clipped", [(0.5, False), (1.5, True)])
def test_rmtpei_step_is_the_closed_form_with_inverse_derivative(threshold, expect_clipped):
    """Alg. A.6: ``u = -eta D^{-1}(h_k - h^_k)``, ``v = h_{k-1}``, robust Sherman-Morrison for k > 1 and
    ``W_1 <- W_1 - eta D_1^{-1}(h_1 - h^_1) h_0^T`` for k = 1. ``threshold = 1.5`` forces the clipped branch."""
    sizes = (6, 6, 6, 6)  # layer 2 is leaky-ReLU, so D_2^{-1} != D_2 matters in the Sherman-Morrison branch
    acts = names(3, "leaky_relu")
    rule = make(RMTPEI, 2, sizes, lr_final_factor=1.0, threshold=threshold, target_stepsize=0.1, layer_seed=1)
    steps = fit(rule, sizes, num_train=12, batch_size=1, seed=4)
    drawn, branches, mixed = set(), set(), 0
    for st in steps:
        (W_before, _), (W_after, inv_after) = st["before"], st["after"]
        x, y = st["x"], st["y"]
        hs, targets = exact_targets(W_before, acts, x, y, 0.1)
        _, pre = forward(W_before, acts, x)
        k = st["layer"]
        drawn.add(k)
        delta = ((hs[k] - targets[k - 1]) / act_deriv(acts[k - 1])(pre[k - 1]))[0]  # D^{-1}(h - h^)
        expected = [W.clone() for W in W_before]
        if k == 1:
            expected[0] = W_before[0] - LR * torch.outer(delta, hs[0][0])
        else:
            expected[k - 1], clipped = alg_4_1(W_before[k - 1], -LR * delta, hs[k - 1][0], threshold)
            branches.add(clipped)
        for a, b in zip(W_after, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        for i in (2, 3):
            torch.testing.assert_close(inv_after[i], torch.linalg.inv(W_after[i - 1]), rtol=1e-11, atol=1e-12)
        # D^{-1} really differs from D in these steps (some negative pre-activation of layer k)
        mixed += int(k < 3 and bool((pre[k - 1] < 0).any()))
    assert drawn == {1, 2, 3}
    assert mixed >= 2
    assert branches == {expect_clipped}


@pytest.mark.parametrize("threshold", [0.5, 1.5])
def test_tpei_minibatch_woodbury_step(threshold):
    """Batch size 8: every layer moves each step; ``W_1`` by SGD on eq. 4.12; ``W_2, W_3`` by
    ``-beta * lr * grad`` with ``beta = 1`` or the robust ``1/(eps - lambda_min(sym K))``; inverses stay exact."""
    sizes = (4, 6, 6, 6)
    acts = names(3, "leaky_relu")
    rule = make(TPEI, 5, sizes, lr_final_factor=1.0, threshold=threshold, target_stepsize=0.1)
    W_start = weights(rule)
    steps = fit(rule, sizes, num_train=32, batch_size=8, seed=2)
    for st in steps:
        (W_before, inv_before), (W_after, inv_after) = st["before"], st["after"]
        x, y = st["x"], st["y"]
        assert x.shape == (8, 4)
        hs, targets = exact_targets(W_before, acts, x, y, 0.1)
        _, pre = forward(W_before, acts, x)
        grads = [local_grad(act_deriv(acts[i - 1])(pre[i - 1]), hs[i], targets[i - 1], hs[i - 1]) for i in (1, 2, 3)]
        torch.testing.assert_close(W_after[0], W_before[0] - LR * grads[0], rtol=1e-12, atol=1e-13)
        for i in (2, 3):
            d = act_deriv(acts[i - 1])(pre[i - 1])
            U = -LR / 8 * (d * (hs[i] - targets[i - 1])).T
            V = hs[i - 1].T
            K = V.T @ torch.linalg.inv(W_before[i - 1]) @ U
            if torch.linalg.svdvals(torch.eye(8, dtype=DT) + K)[-1] >= threshold:
                beta = 1.0
            else:
                beta = float(1 / (threshold - torch.linalg.eigvalsh(0.5 * (K + K.T))[0]))
            assert (beta < 1) == (threshold > 1)
            torch.testing.assert_close(W_after[i - 1], W_before[i - 1] - beta * LR * grads[i - 1], rtol=1e-12, atol=1e-13)
            assert (W_after[i - 1] @ inv_after[i] - torch.eye(6, dtype=DT)).abs().max() < 1e-12
    for i in (1, 2, 3):
        assert (rule.forward_weights[i - 1].detach() - W_start[i - 1]).abs().max() > 1e-5
    assert max(float(e.detach()) for e in rule.inverse_errors()) < 1e-12


def test_tpei_targets_after_training_use_the_maintained_inverse():
    """After Sherman-Morrison steps the inverse buffer still equals ``inv(W)``, so targets stay exact."""
    sizes = (6, 6, 6, 6)
    rule = make(TPEI, 7, sizes, lr_final_factor=1.0, target_stepsize=0.1)
    fit(rule, sizes, num_train=20, batch_size=1)
    x, y = torch.randn(3, 6, dtype=DT), torch.randn(3, 6, dtype=DT)
    _, targets = rule.compute_targets(x, y)
    _, expected = exact_targets(weights(rule), names(3, "leaky_relu"), x, y, 0.1)
    for a, b in zip(targets, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


# ============================================================================================
# Construction errors, optimizer checks, singular weights, drift guard
# ============================================================================================


def test_unequal_sizes_rejected():
    with pytest.raises(ValueError, match="equal layer sizes"):
        TPEI(sizes=[6, 6, 4], forward_optimizer=sgd)
    with pytest.raises(ValueError, match="equal layer sizes"):
        TPEI(sizes=[6, 6, 5, 6], forward_optimizer=sgd)
    TPEI(sizes=[3, 6, 6], forward_optimizer=sgd)  # the first layer may be non-square


def test_no_hidden_layer_rejected():
    with pytest.raises(ValueError, match="hidden layer"):
        TPEI(sizes=[6, 6], forward_optimizer=sgd)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (TPEI, dict(sizes=[6, 6, 6, 6], activation="relu")),  # layer 2 is relu
        (TPEI, dict(sizes=[6, 6, 6], output_activation="relu")),
        (RTPEI, dict(sizes=[6, 6, 6, 6], activation="leaky_relu", negative_slope=0.0)),
        (RMTPEI, dict(sizes=[6, 6, 6], activation="relu")),  # the modified update divides by D_1
    ],
)
def test_non_invertible_activation_rejected(cls, kw):
    with pytest.raises(ValueError, match="has no inverse"):
        cls(forward_optimizer=sgd, **kw)


def test_relu_first_layer_allowed_for_unmodified_rules():
    """``s_1`` is never inverted by TP-EI (targets stop at h^_1), so relu there is fine."""
    rule = make(TPEI, 0, (6, 6, 6), activation="relu")
    x, y = torch.randn(2, 6, dtype=DT), torch.randn(2, 6, dtype=DT)
    _, targets = rule.compute_targets(x, y)
    assert all(bool(torch.isfinite(t).all()) for t in targets)


@pytest.mark.parametrize(
    "opt",
    [
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.01, weight_decay=1e-4),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
    ],
)
def test_forward_optimizer_must_be_plain_sgd(opt):
    rule = TPEI(sizes=[6, 6, 6], forward_optimizer=opt)
    with pytest.raises(ValueError, match="plain SGD"):
        rule.build_optimizers()


def test_plain_sgd_accepted():
    (opt,) = TPEI(sizes=[6, 6, 6], forward_optimizer=sgd).build_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == LR


def test_singular_weights_rejected_by_refresh():
    rule = make(TPEI, 0, (6, 6, 6, 6))
    W = torch.randn(6, 6, dtype=DT)
    W[5] = W[0] + 2 * W[1]  # rank 5
    with torch.no_grad():
        rule.forward_weights[2].copy_(W)
    with pytest.raises(ValueError, match="singular"):
        rule.refresh_inverses()
    with pytest.raises(ValueError, match="singular"):
        rule.load_forward_weights([*weights(rule)[:2], torch.zeros(6, 6, dtype=DT)])


def test_drift_guard_reinverts():
    rule = make(TPEI, 0, (6, 6, 6, 6), inverse_tolerance=1e-4)
    rule._guard_and_log()  # exact inverses: nothing to do
    assert rule.reinversions == 0
    with torch.no_grad():
        rule.inverse(2).add_(1e-2)
    errs = rule.inverse_errors()
    assert float(errs[0]) > 1e-4 and float(errs[1]) < 1e-13
    inv3 = rule.inverse(3).clone()
    rule._guard_and_log()
    assert rule.reinversions == 1
    assert torch.equal(rule.inverse(3), inv3)  # the healthy inverse is left alone
    W2 = rule.forward_weights[1].detach()
    torch.testing.assert_close(rule.inverse(2), torch.linalg.inv(W2), rtol=1e-13, atol=1e-13)
    assert max(float(e.detach()) for e in rule.inverse_errors()) < 1e-13
    rule._guard_and_log()
    assert rule.reinversions == 1
