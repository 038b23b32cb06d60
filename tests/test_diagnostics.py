"""The learning-signal diagnostics (thesis eqs. 5.38-5.41, 5.57-5.61) against independent computations."""
from __future__ import annotations

import math

import pytest
import torch

from tplightning._lightning import pl  # the Lightning package the project's switch chose
import tplightning as tp
from conftest import TP_RULES, make_rule, quiet_trainer, tiny_data, weights_of
from tplightning import functional as F
from tplightning.diagnostics import (
    TargetPropDiagnostics, backprop_signals, diagnostics, gauss_newton_signals, learning_signals, target_prop_signals,
    weight_alignment_angles,
)

D = torch.float64


def double_rule(name, sizes, **kw):
    rule = make_rule(name, sizes, **kw).double()
    if isinstance(rule, tp.ExactInverseRule):
        rule.refresh_inverses()  # the float32 inverses are not exact in float64
    if isinstance(rule, tp.LearnedInverseRule) and rule.feedback_init == "pinv":
        rule.init_feedback_pinv()
    return rule


def batch(sizes, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, sizes[0], generator=g, dtype=D), torch.randn(n, sizes[-1], generator=g, dtype=D)


def perturb_feedback(rule, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for Q in rule.feedback_weights:
            Q.add_(std * torch.randn(Q.shape, generator=g, dtype=Q.dtype))


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_pure_signals_are_the_thesis_products():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(5, 4, generator=g, dtype=D), torch.randn(5, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)]
    d = [torch.rand(2, n, generator=g, dtype=D) + 0.2 for n in (5, 5, 3)]
    e = torch.randn(2, 3, generator=g, dtype=D)
    bp, gn = backprop_signals(W, d, e, 0.1), gauss_newton_signals(W, d, e, 0.1)
    for b in range(2):
        Dg = [torch.diag(x[b]) for x in d]
        pinv = [torch.linalg.pinv(M) for M in W]
        torch.testing.assert_close(bp[1][b], -0.1 * W[2].T @ Dg[2] @ e[b])  # eq. 5.61
        torch.testing.assert_close(bp[0][b], -0.1 * W[1].T @ Dg[1] @ W[2].T @ Dg[2] @ e[b])
        torch.testing.assert_close(gn[1][b], -0.1 * pinv[2] @ torch.linalg.inv(Dg[2]) @ e[b])  # eq. 5.60
        torch.testing.assert_close(gn[0][b], -0.1 * pinv[1] @ torch.linalg.inv(Dg[1]) @ pinv[2] @ torch.linalg.inv(Dg[2]) @ e[b])


def test_target_prop_recursion_unrolls_to_eq_5_39_and_5_40():
    g = torch.Generator().manual_seed(1)
    J = [torch.randn(4, 4, generator=g, dtype=D) for _ in range(3)]  # J_{g_1}, J_{g_2}, J_{g_3}
    r = [torch.randn(1, 4, generator=g, dtype=D) for _ in range(3)]
    e_out = torch.randn(1, 4, generator=g, dtype=D)
    jvps = [lambda v, M=M: v @ M.T for M in J]
    tp_, rec = target_prop_signals(jvps, e_out, r)
    torch.testing.assert_close(tp_[0][0], J[0] @ J[1] @ J[2] @ e_out[0])
    expected = r[0][0] + J[0] @ r[1][0] + J[0] @ J[1] @ r[2][0]  # eq. 5.40 with L = 4
    torch.testing.assert_close(rec[0][0], expected)
    direct = torch.randn(1, 4, generator=g, dtype=D)
    tp_, rec = target_prop_signals([jvps[0], None, jvps[2]], e_out, r, direct={2: direct})
    torch.testing.assert_close(tp_[0][0], J[0] @ direct[0])
    torch.testing.assert_close(rec[0][0], r[0][0])
    assert torch.equal(rec[1], torch.zeros_like(direct))


# --------------------------------------------------------------------------------------------
# Signals of the rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,sizes", [("TPEI", (4, 5, 5, 5)), ("DTPAI", (6, 6, 4, 4)), ("OriginalTP", (5, 6, 6))])
def test_e_bp_is_minus_eta_times_the_backprop_gradient(name, sizes):
    rule = double_rule(name, sizes)
    x, y = batch(sizes)
    s = learning_signals(rule, x, y)
    hs = rule.net.forward_all(x)[0]
    for i in range(1, rule.num_layers):
        h = hs[i].detach().requires_grad_(True)
        out = h
        for k in range(i + 1, rule.num_layers + 1):
            out = rule.net.layer(k, out)[1]
        (grad,) = torch.autograd.grad(F.per_sample_loss(out, y, "mse").sum(), h)
        torch.testing.assert_close(s["e_bp"][i - 1], -rule.target_stepsize * grad)


def test_e_gn_is_the_pseudo_inverse_of_the_jacobian_where_lemma_4_8_allows():
    sizes = (5, 6, 4, 4)  # n_1 > n_2 = n_3: J_i^dagger factorises (lemma 4.8)
    rule = double_rule("DTPAI", sizes)
    x, y = batch(sizes, n=4)
    s = learning_signals(rule, x, y)
    hs = rule.net.forward_all(x)[0]

    def top(h, i):
        for k in range(i + 1, rule.num_layers + 1):
            h = rule.net.layer(k, h)[1]
        return h

    e_L = hs[-1] - y
    for i in (1, 2):
        for b in range(len(x)):
            J = torch.autograd.functional.jacobian(lambda h: top(h, i), hs[i][b].detach())
            torch.testing.assert_close(s["e_gn"][i - 1][b], -rule.target_stepsize * torch.linalg.pinv(J) @ e_L[b].detach())


@pytest.mark.parametrize("activation", ["leaky_relu", "tanh"])
def test_tpei_signal_is_e_tp_up_to_second_order(activation):
    sizes = (4, 5, 5, 5)
    errors = []
    for eta in (1e-3, 5e-4):
        torch.manual_seed(0)
        rule = double_rule("TPEI", sizes, activation=activation, target_stepsize=eta)
        s = learning_signals(rule, *batch(sizes))
        for i in (1, 2):
            assert float(s["e_rec"][i - 1].abs().max()) < 1e-10  # exact inverses in float64
            torch.testing.assert_close(s["e_gn"][i - 1], s["e_tp"][i - 1])  # J_g = W^-1 D^-1: e^GN = e^TP
        errors.append(max(float((a.norm(dim=-1) / t.norm(dim=-1)).max()) for a, t in zip(s["e_approx"], s["e_tp"])))
    if activation == "leaky_relu":
        assert max(errors) < 1e-10  # piece-wise linear: no kink crossed for small steps, e^Taylor = 0
    else:
        assert errors[0] < 1e-2 and 1.8 < errors[0] / errors[1] < 2.2  # e^approx = O(eta^2): relative to e^TP, O(eta^)


def test_tpei_signal_is_aligned_with_gauss_newton():
    rule = double_rule("TPEI", (6, 6, 6, 6))  # eta^ = 0.1: a few samples cross a kink (e^Taylor)
    out = diagnostics(rule, *batch((6, 6, 6, 6), n=16))
    assert all(float(out[f"diag/cos_gn_{i}"]) > 0.95 for i in (1, 2))
    rule.target_stepsize = 1e-4
    out = diagnostics(rule, *batch((6, 6, 6, 6), n=16))
    for i in (1, 2):
        assert out[f"diag/cos_gn_{i}"] == pytest.approx(1.0, abs=1e-9)
        assert out[f"diag/cos_tp_{i}"] == pytest.approx(1.0, abs=1e-9)
        assert float(out[f"diag/norm_approx_{i}"]) < 1e-10
        assert float(out[f"diag/rec_error_{i}"]) < 1e-10


@pytest.mark.parametrize("name", ["DTPAI", "RDTPAI", "OriginalDTP", "LeeDTP", "AOSDTP"])
def test_difference_rules_cancel_reconstruction_errors(name):
    sizes = (5, 6, 6, 6)
    rule = double_rule(name, sizes, **({"aux_units": 2} if name == "AOSDTP" else {}))
    perturb_feedback(rule)
    s = learning_signals(rule, *batch(sizes))
    for i in (1, 2):
        assert torch.equal(s["e_rec"][i - 1], torch.zeros_like(s["e_rec"][i - 1]))
    rec = [r for r in s["rec"] if r is not None]
    assert rec and all(float(r.norm(dim=-1).mean()) > 1e-3 for r in rec)  # the maps themselves are not exact inverses


def test_thesis_form_signals_use_q_and_the_inverse_activation():
    sizes = (5, 6, 6, 6)
    rule = double_rule("TPAI", sizes)
    perturb_feedback(rule)
    x, y = batch(sizes, n=3)
    s = learning_signals(rule, x, y)
    hs, pre = rule.net.forward_all(x)
    Q1, Q2 = rule.feedback_weights
    e_out = -rule.target_stepsize * (hs[3] - y)
    g1 = lambda h: rule.net.activations[1].inverse(h) @ Q1.T  # noqa: E731
    g2 = lambda h: rule.net.activations[2].inverse(h) @ Q2.T  # noqa: E731
    for b in range(3):
        J1 = Q1 @ torch.diag(1 / rule.net.activations[1].derivative(pre[1][b]))  # J_{g_1} at h_2
        J2 = Q2 @ torch.diag(1 / rule.net.activations[2].derivative(pre[2][b]))  # J_{g_2} at h_3
        torch.testing.assert_close(s["e_tp"][0][b], J1 @ J2 @ e_out[b])
        r1, r2 = g1(hs[2][b : b + 1])[0] - hs[1][b], g2(hs[3][b : b + 1])[0] - hs[2][b]
        torch.testing.assert_close(s["e_rec"][0][b], r1 + J1 @ r2)  # eq. 5.58
    err = diagnostics(rule, x, y)["diag/q_pinv_error_1"]
    expected = torch.linalg.matrix_norm(Q1.detach() - torch.linalg.pinv(rule.forward_weights[1].detach()))
    assert float(err) == pytest.approx(float(expected))


def test_original_form_jacobian_and_misalignment():
    sizes = (5, 6, 6)
    rule = double_rule("OriginalTP", sizes)
    x, y = batch(sizes, n=3)
    s = learning_signals(rule, x, y)
    hs, _ = rule.net.forward_all(x)
    (Q,) = rule.feedback_weights
    s1 = rule.net.activations[0]
    for b in range(3):
        J = torch.diag(s1.derivative(Q @ hs[2][b])) @ Q  # g_1 = s_1(Q h) at h_2
        torch.testing.assert_close(s["e_tp"][0][b], J @ (-rule.target_stepsize * (hs[2][b] - y[b])))
    torch.testing.assert_close(s["e_rec"][0], s1(hs[2] @ Q.T) - hs[1])  # s(W^+ W h) != h: reconstruction error
    assert float(s["e_rec"][0].norm()) > 1e-2


def test_leedtp_penultimate_signal_is_the_gradient_step():
    sizes = (5, 6, 6, 4)
    rule = double_rule("LeeDTP", sizes)
    s = learning_signals(rule, *batch(sizes))
    assert s["direct"] == [2]
    torch.testing.assert_close(s["delta"][1], s["e_bp"][1])
    torch.testing.assert_close(s["e_tp"][1], s["e_bp"][1])
    out = diagnostics(rule, *batch(sizes))
    assert out["diag/cos_bp_2"] == pytest.approx(1.0) and "diag/rec_error_2" not in out


def test_layers_argument_and_bp_rules_are_no_ops():
    rule = make_rule("DTPAI", (6, 6, 6, 6))
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    assert {k.rsplit("_", 1)[1] for k in diagnostics(rule, x, y, layers=[2])} == {"2"}
    assert diagnostics(make_rule("BP"), x, y) == {}


@pytest.mark.parametrize("name", TP_RULES)
def test_diagnostics_change_no_state(name):
    rule = make_rule(name, (6, 6, 6, 6))
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    rule.train()
    before = weights_of(rule)
    gens = [g.get_state() for g in vars(rule).values() if isinstance(g, torch.Generator)]
    rng = torch.get_rng_state()
    out = diagnostics(rule, x, y)
    assert out and all(torch.isfinite(v) for v in out.values())
    assert all(torch.equal(a, b) for a, b in zip(before, weights_of(rule)))
    assert all(torch.equal(a, g.get_state()) for a, g in zip(gens, [g for g in vars(rule).values() if isinstance(g, torch.Generator)]))
    assert torch.equal(rng, torch.get_rng_state())


# --------------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------------


def _fit(name, callbacks, **trainer_kw):
    torch.manual_seed(0)
    rule = make_rule(name)
    quiet_trainer(max_epochs=2, callbacks=callbacks, **trainer_kw).fit(rule, datamodule=tiny_data())
    return rule


@pytest.mark.parametrize("name", ["TPEI", "DTPAI", "OriginalTP", "LeeDTP"])
def test_callback_logs_and_leaves_training_unchanged(name, tmp_path):
    plain = _fit(name, [])
    cb = TargetPropDiagnostics(every_n_steps=3, max_samples=5)
    logger = pl.loggers.CSVLogger(tmp_path, name="diag")
    trainer_kw = {"logger": logger, "log_every_n_steps": 50}  # diagnostics on steps Lightning does not log
    watched = _fit(name, [cb], **trainer_kw)
    assert all(torch.equal(a, b) for a, b in zip(weights_of(plain), weights_of(watched)))
    assert len(cb.history) == 6  # 16 batches, every 3rd from the first
    keys = {"diag/cos_tp_1", "diag/cos_gn_1", "diag/cos_bp_1", "diag/norm_signal_1", "diag/norm_approx_1", "diag/norm_rec_1"}
    assert keys <= set(cb.history[-1])
    assert keys <= set(watched.trainer.callback_metrics)
    logger.save()
    header = (tmp_path / "diag" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "diag/cos_gn_1" in header


def test_callback_is_a_no_op_for_bp():
    cb = TargetPropDiagnostics(every_n_steps=1)
    rule = _fit("BP", [cb])
    assert cb.history == [] and not any(k.startswith("diag/") for k in rule.trainer.callback_metrics)


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        TargetPropDiagnostics(every_n_steps=0)


@pytest.mark.parametrize("slope", [0.35, 0.6, 0.8])
def test_thesis_form_signal_departs_from_the_gradient_as_the_closed_form_says(slope):
    # Issue 14 (why DTP-AI trails on MNIST): with orthogonal W and Q = W^T, layer i's thesis-form signal is the upper
    # signal through D^-1 of each layer above (up to the output's), backprop's through D. Per layer, with a fraction p
    # of negative leaky-ReLU units, cos(D^-1 v, D v) = ((1 - p + p/a^2)(1 - p + p a^2))^-1/2, compounding downwards.
    torch.manual_seed(0)
    sizes = [784, 256, 256, 256, 256, 256, 10]
    rule = tp.DTPAI(sizes=sizes, activation="leaky_relu", negative_slope=slope, output_activation="linear", bias=False,
                    init="orthogonal", loss="cross_entropy", target_stepsize=1e-3)  # fmt: skip
    x, y = torch.randn(256, 784), torch.randint(10, (256,))
    out = diagnostics(rule, x, y)
    with torch.no_grad():
        pre = [x @ W.T for W in rule.forward_weights[:1]]
        for W in rule.forward_weights[1:-1]:
            pre.append(torch.nn.functional.leaky_relu(pre[-1], slope) @ W.T)
    p = [float((a < 0).double().mean()) for a in pre]  # layers 1..5

    def per_layer(q):
        return ((1 - q + q / slope**2) * (1 - q + q * slope**2)) ** -0.5

    for i in range(1, 6):
        expected = math.prod(per_layer(q) for q in p[i:])  # the D's of layers i+1..5
        assert float(out[f"diag/cos_bp_{i}"]) == pytest.approx(expected, abs=0.02), (i, expected)


# --------------------------------------------------------------------------------------------
# Feedback alignment and the successors of DTP
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.0, 30.0, 90.0, 135.0])
def test_fa_weight_angle_is_the_angle_between_b_and_w_transposed(theta):
    """``B = cos(t) W^T/|W| + sin(t) N/|N|`` with ``N`` Frobenius-orthogonal to ``W^T`` has angle ``t`` to ``W^T`` by construction."""
    rule = double_rule("FA", (5, 6, 4, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in rule.maps:
            Wt = m.upper.weight.T
            N = torch.randn(Wt.shape, generator=g, dtype=D)
            N = N - (N * Wt).sum() / (Wt * Wt).sum() * Wt
            t = torch.tensor(theta, dtype=D).deg2rad()
            m.B.copy_(torch.cos(t) * Wt / Wt.norm() + torch.sin(t) * N / N.norm())
    angles = weight_alignment_angles(rule)
    assert sorted(angles) == [1, 2]
    for a in angles.values():
        assert float(a) == pytest.approx(theta, abs=1e-6)
    assert float(diagnostics(rule, *batch((5, 6, 4, 3)))["diag/weight_angle_2"]) == pytest.approx(theta, abs=1e-6)


def test_dfa_weight_angle_is_against_the_transposed_path_to_the_output():
    rule = double_rule("DFA", (5, 6, 4, 3))
    W1, W2, W3 = (W.detach() for W in rule.forward_weights)
    with torch.no_grad():
        rule.maps[0].B.copy_(-(W3 @ W2).T)  # the opposite of the path from layer 1 to the output: 180 degrees
        rule.maps[1].B.copy_(2 * W3.T)  # a multiple of it: 0 degrees
    angles = weight_alignment_angles(rule)
    assert float(angles[1]) == pytest.approx(180.0, abs=1e-5) and float(angles[2]) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", ["FA", "DFA", "BDFA", "DRL", "DDTPLinear", "LDRL"])
def test_gauss_newton_and_backprop_angles_exist_for_the_comparators(name):
    sizes = (5, 6, 6, 4)
    rule = double_rule(name, sizes, activation="tanh")
    out = diagnostics(rule, *batch(sizes))
    for i in (1, 2):
        for key in (f"diag/cos_gn_{i}", f"diag/cos_bp_{i}", f"diag/cos_tp_{i}"):
            assert torch.isfinite(out[key]) and -1 <= float(out[key]) <= 1, key
    assert ("diag/weight_angle_1" in out) == (name in ("FA", "DFA", "BDFA"))


def test_fa_signal_is_backprops_when_b_is_w_transposed():
    """With ``B_i = W_{i+1}^T`` the FA signal ``delta`` (eq. 3.18) is backprop's (eq. 3.19): ``cos_bp = 1``."""
    sizes = (5, 6, 6, 4)
    rule = double_rule("FA", sizes, activation="tanh")
    with torch.no_grad():
        for m in rule.maps:
            m.B.copy_(m.upper.weight.T)
    out = diagnostics(rule, *batch(sizes))
    assert float(out["diag/cos_bp_1"]) == pytest.approx(1.0, abs=1e-9) and float(out["diag/weight_angle_1"]) < 1e-5


def test_weight_alignment_angle_above_a_block_compares_every_feedback_weight_with_its_forward_weight():
    import numpy as np
    from torch import nn

    from tplightning.diagnostics import weight_alignment_angles

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    rule = tp.FA(network=tp.convert(model))
    g = rule.maps[0].base  # the map below block 1 (Linear(5, 3) -> Tanh)
    B = g.slot_feedback(0).detach().numpy().ravel()
    W = model[2].weight.detach().numpy().T.ravel()  # B_k is stored as W_k^T
    expected = np.degrees(np.arccos(B @ W / (np.linalg.norm(B) * np.linalg.norm(W))))
    angles = weight_alignment_angles(rule)
    assert abs(float(angles[1]) - expected) < 1e-3
    with torch.no_grad():
        g.slot_feedback(0).copy_(-model[2].weight.T)  # anti-aligned
    assert abs(float(weight_alignment_angles(rule)[1]) - 180.0) < 0.1
