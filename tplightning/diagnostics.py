"""Diagnostics that explain what every target-propagation rule sends to its hidden layers.

For a hidden layer ``i`` the learning signal is ``Delta_i = h^_i - h_i`` (the target minus the
activation). The thesis splits it by a first-order Taylor expansion (eq. 5.38) and compares it
with the signals of second- and first-order optimisation (section 5.1.3 and 5.2.2):

* ``e^TP_i = -eta^ [prod_{k=i}^{L-1} J_{g_k}] e_L`` (eq. 5.39 / 5.57), the useful signal, with
  ``J_{g_k}`` the Jacobian of the rule's feedback map ``g_k`` at ``h_{k+1}`` and ``e_L = dl/dh_L``;
* ``e^rec_i = r_i + sum_{j>i} (prod_{k=i}^{j-1} J_{g_k}) r_j`` with ``r_j = g_j(h_{j+1}) - h_j``
  (eq. 5.40 / 5.58), the (propagated) reconstruction errors; it is zero by construction for the
  difference rules, whose targets ``h_i + g_i(h^_{i+1}) - g_i(h_{i+1})`` cancel ``r_i`` (eq. 4.101);
* ``e^approx_i = Delta_i - e^TP_i = e^rec_i + e^Taylor_i`` (eq. 5.41 / 5.59);
* ``e^GN_i = -eta^ [prod_{k=i+1}^{L} W_k^dagger D_{s_k}^{-1}] e_L`` (eq. 5.60), the signal of
  (block-diagonal) Gauss-Newton, and ``e^BP_i = -eta^ [prod_{k=i+1}^{L} W_k^T D_{s_k}] e_L``
  (eq. 5.61), ``-eta^`` times the backpropagated gradient ``dl/dh_i``.

The math lives in small functions on plain tensors (:func:`backprop_signals`,
:func:`gauss_newton_signals`, :func:`target_prop_signals`) and in :func:`learning_signals`,
which reads a rule's forward pass, targets and feedback maps without changing any weight or
generator state. :class:`TargetPropDiagnostics` logs batch means of the cosines and norms during
training (figs. 5.8, 5.16-5.19).

``J_{g_k}`` is taken as the Jacobian of the rule's own ``propagate(k, ., hs, pre)`` (its target map
``rule.maps[k-1]``, :mod:`tplightning.target_maps`) with respect to ``h^_{k+1}`` at ``h_{k+1}``: for plain
maps that is ``g_k`` itself, for :class:`~tplightning.target_maps.Difference` maps it is
``h_k + g_k(.) - g_k(h_{k+1})``, whose Jacobian is again ``J_{g_k}``. So the diagnostics need no
per-rule code. Maps that set the target directly, not through a feedback map (``direct``, e.g.
LeeDTP's penultimate :class:`~tplightning.target_maps.GradientTarget`), count as their own useful signal:
``e^TP = Delta``, ``e^rec = e^approx = 0`` there, and the layers below chain from it.

>>> import torch
>>> import tplightning as tp
>>> from tplightning.diagnostics import diagnostics
>>> rule = tp.DTPAI(sizes=[3, 3, 3])
>>> values = diagnostics(rule, torch.randn(4, 3), torch.randn(4, 3))
>>> round(float(values["diag/cos_tp_1"]), 3)  # a difference rule's signal is its useful signal
1.0
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from ._lightning import pl
import torch
from torch import Tensor

from . import functional as F
from .layers import Dense
from .target_maps import Difference, DirectFeedback, FeedbackAlignment, ThesisInverse

__all__ = [
    "TargetPropDiagnostics",
    "backprop_signals",
    "gauss_newton_signals",
    "target_prop_signals",
    "feedback_jvp",
    "feedback_map",
    "learning_signals",
    "forward_pass",
    "effective_weights",
    "summarize",
    "diagnostics",
    "is_target_prop",
    "weight_alignment_angles",
    "damped_gn_activation_updates",
    "angle_degrees",
    "output_jacobians",
    "gnt_weight_updates",
    "rule_weight_updates",
    "gnt_angles",
    "null_space_shares",
    "gauss_newton_angles",
    "damping_search",
    "DAMPING_GRID",
]


# --------------------------------------------------------------------------------------------
# Pure tensor math
# --------------------------------------------------------------------------------------------


def _down_from_output(step: Callable[[int, Tensor], Tensor], L: int, v_L: Tensor) -> list[Tensor]:
    """``[v_1, ..., v_{L-1}]`` of the recursion ``v_{k-1} = step(k, v_k)`` from ``v_L``: the products of eqs. 5.60-5.61."""
    out: list[Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    v = v_L
    for k in range(L, 1, -1):
        v = step(k, v)
        out[k - 2] = v
    return out


def backprop_signals(weights: Sequence[Tensor], derivs: Sequence[Tensor], e_L: Tensor, target_stepsize: float) -> list[Tensor]:
    """``e^BP_i = -eta^ [prod_{k=i+1}^L W_k^T D_{s_k}] e_L`` for ``i = 1..L-1`` (eq. 5.61).

    Args:
        weights: ``[W_1, ..., W_L]``, ``W_k`` of shape ``(n_k, n_{k-1})``.
        derivs: ``[d_1, ..., d_L]``, the diagonals of ``D_{s_k}`` per sample, ``(B, n_k)``.
        e_L: output error ``dl/dh_L``, ``(B, n_L)``.
        target_stepsize: ``eta^``.

    Returns:
        ``[e^BP_1, ..., e^BP_{L-1}]``, ``e^BP_i`` of shape ``(B, n_i)``: ``-eta^ dl/dh_i``.

    >>> W1, W2 = torch.eye(3), torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    >>> derivs = [torch.ones(1, 3), torch.tensor([[1.0, 0.5]])]
    >>> backprop_signals([W1, W2], derivs, torch.tensor([[1.0, 1.0]]), 0.5)  # -0.5 W_2^T D_2 e_L
    [tensor([[-1., -1.,  0.]])]
    """
    return _down_from_output(lambda k, v: (derivs[k - 1] * v) @ weights[k - 1], len(weights), -target_stepsize * e_L)  # W_k^T D_k v, row-wise


def gauss_newton_signals(
    weights: Sequence[Tensor], derivs: Sequence[Tensor], e_L: Tensor, target_stepsize: float
) -> list[Tensor]:
    """``e^GN_i = -eta^ [prod_{k=i+1}^L W_k^dagger D_{s_k}^{-1}] e_L`` for ``i = 1..L-1`` (eq. 5.60).

    The factorised pseudo-inverse of lemma 4.8 (``= -eta^ J_i^dagger e_L`` for the architectures
    it allows). Arguments as in :func:`backprop_signals`; ``W_k^dagger`` is computed in float64
    (:func:`~tplightning.functional.pinv64`).

    >>> W1, W2 = torch.eye(3), torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    >>> derivs = [torch.ones(1, 3), torch.tensor([[1.0, 0.5]])]
    >>> gauss_newton_signals([W1, W2], derivs, torch.tensor([[1.0, 1.0]]), 0.5)  # -0.5 W_2^dagger D_2^{-1} e_L
    [tensor([[-0.2500, -0.2500,  0.0000]])]
    """
    return _down_from_output(lambda k, v: (v / derivs[k - 1]) @ F.pinv64(weights[k - 1]).T, len(weights), -target_stepsize * e_L)  # W_k^dagger D_k^{-1} v, row-wise


def target_prop_signals(
    jvps: Sequence[Callable[[Tensor], Tensor] | None],
    e_out: Tensor,
    residuals: Sequence[Tensor | None] | None = None,
    direct: dict[int, Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """``e^TP_i`` (eq. 5.39 / 5.57) and ``e^rec_i`` (eq. 5.40 / 5.58) for ``i = 1..L-1``.

    By the recursions ``e^TP_L = e_out``, ``e^TP_i = J_{g_i} e^TP_{i+1}`` and ``e^rec_L = 0``,
    ``e^rec_i = r_i + J_{g_i} e^rec_{i+1}``, which unroll to the products of the thesis.

    Args:
        jvps: ``jvps[i-1](v) = J_{g_i} v`` (batched, row-wise) for ``i = 1..L-1``; ``None`` for
            layers in ``direct``.
        e_out: the output signal ``h^_L - h_L = -eta^ e_L``, ``(B, n_L)``.
        residuals: ``residuals[i-1] = r_i = g_i(h_{i+1}) - h_i`` (``None``: zero, as for difference
            rules).
        direct: ``{i: Delta_i}`` for layers whose targets the rule sets without a feedback map:
            there ``e^TP_i = Delta_i`` and ``e^rec_i = 0``.

    Returns:
        ``([e^TP_1, ..., e^TP_{L-1}], [e^rec_1, ..., e^rec_{L-1}])``.

    Two hidden layers with ``J_{g_1} = 2 I``, ``J_{g_2} = I`` and residuals ``r_1``, ``r_2``:

    >>> e_tp, e_rec = target_prop_signals([lambda v: 2 * v, lambda v: v], torch.tensor([[1.0, -1.0]]),
    ...                                   [torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])])
    >>> [e.tolist() for e in e_tp], [e.tolist() for e in e_rec]  # e^rec_1 = r_1 + J_{g_1} r_2
    ([[[2.0, -2.0]], [[1.0, -1.0]]], [[[0.5, 2.0]], [[0.0, 1.0]]])
    """
    L = len(jvps) + 1
    direct = direct or {}
    residuals = residuals or [None] * (L - 1)
    e_tp: list[Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    e_rec: list[Tensor] = [None] * (L - 1)  # type: ignore[list-item]
    tp, rec = e_out, torch.zeros_like(e_out)
    for i in range(L - 1, 0, -1):
        if i in direct:
            tp, rec = direct[i], torch.zeros_like(direct[i])
        else:
            jvp = jvps[i - 1]
            if jvp is None:
                raise ValueError(f"layer {i} needs a Jacobian-vector product of g_{i} or a direct signal")
            tp = jvp(tp)
            rec = jvp(rec) if bool(rec.any()) else torch.zeros_like(tp)
            if residuals[i - 1] is not None:
                rec = rec + residuals[i - 1]
        e_tp[i - 1], e_rec[i - 1] = tp, rec
    return e_tp, e_rec


# --------------------------------------------------------------------------------------------
# Reading a rule
# --------------------------------------------------------------------------------------------


def is_target_prop(rule) -> bool:
    """Whether ``rule`` propagates targets through target maps (``rule.maps``); BP rules do not.

    >>> import tplightning as tp
    >>> is_target_prop(tp.DTPAI(sizes=[3, 3, 3])), is_target_prop(tp.BP(sizes=[3, 3, 3]))
    (True, False)
    """
    return callable(getattr(rule, "targets_from", None)) and isinstance(getattr(rule, "maps", None), torch.nn.ModuleList)


def feedback_jvp(rule, i: int, hs: Sequence[Tensor], pre: Sequence[Tensor]) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``(propagate(i, h_{i+1}), v -> J_{g_i} v)``: the map of layer ``i`` at ``h^_{i+1} = h_{i+1}`` and its JVP.

    The Jacobian is that of ``h^_{i+1} -> propagate(i, h^_{i+1}, hs, pre)`` at ``h_{i+1}``
    (forward-mode autograd, :func:`torch.func.jvp`), i.e. ``J_{g_i}`` for plain and difference rules.

    Args:
        rule: a target-propagation rule (:func:`is_target_prop`).
        i: hidden layer, ``1..L-1``.
        hs: the forward pass ``[h_0, ..., h_L]``.
        pre: the pre-activations ``[a_1, ..., a_L]``.

    >>> import tplightning as tp
    >>> rule = tp.DTPAI(sizes=[3, 3, 3])
    >>> hs, pre = forward_pass(rule, torch.randn(4, 3))
    >>> value, jvp = feedback_jvp(rule, 1, hs, pre)
    >>> torch.allclose(value, hs[1]), tuple(jvp(torch.ones(4, 3)).shape)  # a difference map returns h_1 at h_2
    (True, (4, 3))
    """
    h_next = hs[i + 1]

    def f(h: Tensor) -> Tensor:
        return rule.propagate(i, h, list(hs), list(pre))

    value = f(h_next)

    def jvp(v: Tensor) -> Tensor:
        return torch.func.jvp(f, (h_next,), (v.to(h_next.dtype),))[1]

    return value, jvp


def feedback_map(rule, i: int) -> Callable[[Tensor], Tensor] | None:
    """The feedback map ``g_i`` of ``rule`` (``None`` where its map sets the target directly, e.g. LeeDTP's top layer).

    The map is ``rule.maps[i - 1]``, called on ``h_{i+1}``; for a difference rule it is the whole difference map.

    >>> import tplightning as tp
    >>> feedback_map(tp.LeeDTP(sizes=[3, 3, 3, 3]), 2) is None, feedback_map(tp.LeeDTP(sizes=[3, 3, 3, 3]), 1) is None
    (True, False)
    """
    m = rule.maps[i - 1]
    return None if m.direct else m


def forward_pass(rule, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The rule's training forward pass ``([h_0..h_L], [a_1..a_L])`` without its side effects.

    Uses ``rule.forward_pass`` where it exists (MTP normalises layer inputs and keeps the batch
    statistics its ``propagate`` needs) and restores every buffer afterwards, so running
    statistics do not move.

    >>> import tplightning as tp
    >>> hs, pre = forward_pass(tp.DTPAI(sizes=[3, 4, 2]), torch.randn(5, 3))
    >>> [tuple(h.shape) for h in hs], [tuple(a.shape) for a in pre]
    ([(5, 3), (5, 4), (5, 2)], [(5, 4), (5, 2)])
    """
    fwd = getattr(rule, "forward_pass", None) or rule.net.forward_all
    saved = [(b, b.detach().clone()) for b in rule.buffers()]
    hs, pre = fwd(x)
    with torch.no_grad():
        for b, value in saved:
            b.copy_(value)
    return list(hs), list(pre)


def effective_weights(rule, hs: Sequence[Tensor]) -> list[Tensor]:
    """``W_k`` times the per-unit gain of the map from ``h_{k-1}`` to the input layer ``k`` received.

    Plain rules feed ``h_{k-1}`` itself (gain 1, ``W_k`` returned as is). A rule whose
    ``layer_input(k, hs)`` is a per-unit affine map ``c * h_{k-1} + b`` of ``h_{k-1}`` (MTP's
    batch normalisation with the batch's statistics held fixed) has layer Jacobian
    ``D_{s_k} W_k diag(c)``; ``c`` is recovered by least squares over the batch.

    Args:
        rule: a rule with ``rule.net``.
        hs: its forward pass ``[h_0, ..., h_L]`` (:func:`forward_pass`).

    Returns:
        ``[W_1 diag(c_1), ..., W_L diag(c_L)]``, detached; AO-SDTP's output layer with its auxiliary rows.

    >>> import tplightning as tp
    >>> rule = tp.DTPAI(sizes=[3, 3, 3])
    >>> hs, _ = forward_pass(rule, torch.randn(4, 3))
    >>> all(torch.equal(E, W) for E, W in zip(effective_weights(rule, hs), rule.net.weights))  # gain 1
    True
    """
    layer_input = getattr(rule, "layer_input", None)
    out = []
    for k, W in enumerate((layer.full_weight() for layer in rule.net.layers), start=1):  # AOSDTP: with the auxiliary rows
        W = W.detach()
        h = hs[k - 1]
        h_in = layer_input(k, list(hs)) if layer_input is not None else h
        if h_in is h or h.shape[0] < 2:
            out.append(W)
            continue
        hc, ic = h - h.mean(0), h_in - h_in.mean(0)
        gain = (hc * ic).sum(0) / (hc * hc).sum(0).clamp_min(torch.finfo(h.dtype).tiny)
        out.append(W * gain)
    return out


@torch.no_grad()
def learning_signals(rule, x: Tensor, y: Tensor) -> dict:
    """Every signal of the thesis' analysis for a batch ``(x, y)``; changes no weight, buffer or generator.

    ``e_L`` is read off the rule's own output target, ``e_L = (h_L - h^_L) / eta^`` (``dl/dh_L``
    for the losses of eq. 4.4; zero on AOSDTP's auxiliary outputs, which have no target).

    Returns a dict with the forward pass (``hs``, ``pre``), ``targets``, ``e_L`` and, as lists over
    the hidden layers ``i = 1..L-1`` of per-sample ``(B, n_i)`` tensors: ``delta``
    (``h^_i - h_i``), ``e_tp``, ``e_rec``, ``e_approx``, ``e_gn``, ``e_bp``, ``rec``
    (``g_i(h_{i+1}) - h_i`` of the feedback map, ``None`` where the layer has none) and
    ``direct`` (the layers whose targets the rule sets directly). Runs under ``no_grad`` (the
    Jacobian-vector products use forward-mode autograd, which ``no_grad`` leaves on). The Gauss-Newton and backprop
    signals are matrix products of dense layers: a network with other layers (a CNN) gets a ``ValueError``.

    Args:
        rule: a target-propagation rule (:func:`is_target_prop`) with dense layers.
        x: input batch ``(B, n_0)``.
        y: its labels.

    >>> import tplightning as tp
    >>> rule = tp.DTPAI(sizes=[3, 3, 3])
    >>> signals = learning_signals(rule, torch.randn(4, 3), torch.randn(4, 3))
    >>> [tuple(e.shape) for e in signals["e_gn"]], signals["direct"], float(signals["e_rec"][0].abs().max())
    ([(4, 3)], [], 0.0)
    """
    L = rule.num_layers
    other = [f"{k} ({type(layer).__name__})" for k, layer in enumerate(rule.net.layers, start=1) if not isinstance(layer, Dense)]
    if other:
        raise ValueError(f"the learning-signal diagnostics (e^GN, e^BP of eqs. 5.60-5.61) need dense layers; layers {', '.join(other)} are not")
    hs, pre = forward_pass(rule, x)
    targets = rule.targets_from(hs, pre, y, 1)
    delta = [targets[i - 1] - hs[i] for i in range(1, L)]
    direct = {i: delta[i - 1] for i in range(1, L) if rule.maps[i - 1].direct}
    jvps: list = [None] * (L - 1)
    residuals: list = [None] * (L - 1)
    for i in range(1, L):
        if i in direct:
            continue
        value, jvps[i - 1] = feedback_jvp(rule, i, hs, pre)
        if not isinstance(rule.maps[i - 1], Difference):  # difference maps cancel r_i by construction (eq. 4.101): e^rec = 0, not round-off
            residuals[i - 1] = value - hs[i]
    e_out = targets[L - 1] - hs[L]
    e_tp, e_rec = target_prop_signals(jvps, e_out, residuals, direct)
    eta = rule.target_stepsize
    e_L = -e_out / eta
    derivs = [act.derivative(a) for act, a in zip(rule.net.activations, pre)]
    weights = effective_weights(rule, hs)
    rec = []  # g_i(f_{i+1}(h_i)) - h_i = g_i(h_{i+1}) - h_i
    for i in range(1, L):
        if residuals[i - 1] is not None:
            rec.append(residuals[i - 1])  # the rule's whole feedback map (MTP: de-normalised)
        else:  # difference rules cancel r_i in their targets; report the map g_i itself
            g = feedback_map(rule, i)
            rec.append(None if g is None else g(hs[i + 1]) - hs[i])
    return {
        "hs": hs,
        "pre": pre,
        "targets": targets,
        "e_L": e_L,
        "delta": delta,
        "e_tp": e_tp,
        "e_rec": e_rec,
        "e_approx": [d - t for d, t in zip(delta, e_tp)],
        "e_gn": gauss_newton_signals(weights, derivs, e_L, eta),
        "e_bp": backprop_signals(weights, derivs, e_L, eta),
        "rec": rec,
        "direct": sorted(direct),
    }


def pinv_errors(rule) -> dict[int, Tensor]:
    """``||Q_i - W_{i+1}^dagger||_F`` for the thesis-form maps ``g_i = Q_i s^{-1}`` of a rule (dense layers; else empty).

    ``{i: error}``, the difference taken in float64 (``W^dagger`` by :func:`~tplightning.functional.pinv64`), the result
    in ``Q``'s dtype.

    >>> import tplightning as tp
    >>> rule = tp.DTPAI(sizes=[3, 3, 3])  # feedback_init="pinv": Q_1 = W_2^dagger, rounded to float32
    >>> {i: round(float(err), 3) for i, err in pinv_errors(rule).items()}
    {1: 0.0}
    """
    out = {}
    for m in rule.maps:
        if isinstance(m.base, ThesisInverse) and isinstance(m.upper, Dense):
            Q = m.base.Q.detach()
            out[m.index] = torch.linalg.matrix_norm(Q.double() - F.pinv64(m.upper.full_weight(), torch.float64)).to(Q.dtype)
    return out


def weight_alignment_angles(rule) -> dict[int, Tensor]:
    """Angle in degrees between each feedback-alignment matrix and the weights backprop would use in its place.

    FA (:class:`~tplightning.target_maps.FeedbackAlignment`): ``B_i`` against ``W_{i+1}^T`` (Lillicrap et al. 2016: the
    forward weights come to align with the fixed feedback); DFA (:class:`~tplightning.target_maps.DirectFeedback`):
    ``B~_i`` against ``(W_L ... W_{i+1})^T``, the linear path backprop takes from the output (Noekland 2016). The angle
    is ``arccos(<A, B>_F / (||A||_F ||B||_F))``, both matrices flattened; above a block, all its ``B_k`` against their
    submodules' weights ``W_k`` as one flattened vector. Empty for rules without such maps; the DFA
    angle needs dense layers above (others are skipped); the product ``W_L ... W_{i+1}`` is
    :func:`~tplightning.functional.weight_product`.

    >>> import tplightning as tp
    >>> rule = tp.FA(sizes=[3, 3, 3])
    >>> with torch.no_grad():
    ...     _ = rule.maps[0].base.B.copy_(rule.net.weights[1].T)  # B_1 = W_2^T: aligned
    >>> {i: float(angle) < 0.1 for i, angle in weight_alignment_angles(rule).items()}
    {1: True}
    """
    out = {}
    for m in rule.maps:
        if isinstance(m.base, FeedbackAlignment) and m.base.block_slots():  # a block above: every B_k against its W_k
            fb = m.base.block_feedback()
            B = torch.cat([b.flatten() for b in fb.values()])
            ref = torch.cat([m.upper.module.get_submodule(name).weight.flatten() for name in fb])
        elif isinstance(m.base, FeedbackAlignment):
            B, ref = m.base.B, m.upper.adjoint()
        elif isinstance(m.base, DirectFeedback) and all(isinstance(layer, Dense) for layer in rule.net.layers[m.index:]):
            B, ref = m.base.B, F.weight_product([layer.full_weight() for layer in rule.net.layers[m.index:]]).T
        else:
            continue
        ref = ref.detach()
        cos = (B * ref).sum() / (B.norm() * ref.norm()).clamp_min(1e-30)
        out[m.index] = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    return out


def summarize(signals: dict, layers: Sequence[int] | None = None, prefix: str = "diag/") -> dict[str, Tensor]:
    """Batch means of the cosines and norms of :func:`learning_signals`, keyed like ``diag/cos_gn_1``.

    Per hidden layer ``i``: ``cos_tp_i``, ``cos_gn_i``, ``cos_bp_i`` (cosine between ``Delta_i``
    and ``e^TP_i``, ``e^GN_i``, ``e^BP_i``), ``norm_signal_i`` (``||Delta_i||``), ``norm_tp_i``,
    ``norm_approx_i``, ``norm_rec_i`` (``||e^rec_i||``) and ``rec_error_i``
    (``||g_i(f_{i+1}(h_i)) - h_i||``, where layer ``i`` has a feedback map).

    Args:
        signals: what :func:`learning_signals` returned.
        layers: hidden layers to report (1-based; ``None``: all ``1..L-1``).
        prefix: put before every key.

    >>> import tplightning as tp
    >>> rule = tp.DTPAI(sizes=[3, 3, 3])
    >>> values = summarize(learning_signals(rule, torch.randn(4, 3), torch.randn(4, 3)))
    >>> sorted(values)
    ['diag/cos_bp_1', 'diag/cos_gn_1', 'diag/cos_tp_1', 'diag/norm_approx_1', 'diag/norm_rec_1',
     'diag/norm_signal_1', 'diag/norm_tp_1', 'diag/rec_error_1']
    """
    L = len(signals["delta"]) + 1
    out: dict[str, Tensor] = {}
    for i in layers or range(1, L):
        d = signals["delta"][i - 1]
        for name in ("tp", "gn", "bp"):
            out[f"{prefix}cos_{name}_{i}"] = F.cosine(d, signals[f"e_{name}"][i - 1]).mean()
        out[f"{prefix}norm_signal_{i}"] = d.norm(dim=-1).mean()
        out[f"{prefix}norm_tp_{i}"] = signals["e_tp"][i - 1].norm(dim=-1).mean()
        out[f"{prefix}norm_approx_{i}"] = signals["e_approx"][i - 1].norm(dim=-1).mean()
        out[f"{prefix}norm_rec_{i}"] = signals["e_rec"][i - 1].norm(dim=-1).mean()
        if signals["rec"][i - 1] is not None:
            out[f"{prefix}rec_error_{i}"] = signals["rec"][i - 1].norm(dim=-1).mean()
    return out


def diagnostics(rule, x: Tensor, y: Tensor, layers: Sequence[int] | None = None, prefix: str = "diag/") -> dict[str, Tensor]:
    """The scalars :class:`TargetPropDiagnostics` logs for a batch: :func:`summarize` plus ``q_pinv_error_i`` and, for
    FA/DFA, ``weight_angle_i`` (:func:`weight_alignment_angles`).

    ``{}`` for rules that do not propagate targets (BP, BPFixed). Runs under ``no_grad``; changes no weight,
    buffer or generator.

    Args:
        rule: any rule.
        x: input batch ``(B, n_0)``.
        y: its labels.
        layers: hidden layers to report (1-based; ``None``: all; others are dropped).
        prefix: put before every key.

    >>> import tplightning as tp
    >>> x, y = torch.randn(4, 3), torch.randn(4, 3)
    >>> "diag/q_pinv_error_1" in diagnostics(tp.DTPAI(sizes=[3, 3, 3]), x, y), diagnostics(tp.BP(sizes=[3, 3, 3]), x, y)
    (True, {})
    """
    if not is_target_prop(rule):
        return {}
    L = rule.num_layers
    layers = list(range(1, L)) if layers is None else [i for i in layers if 1 <= i < L]
    with torch.no_grad():
        out = summarize(learning_signals(rule, x, y), layers, prefix)
        for name, values in (("q_pinv_error", pinv_errors(rule)), ("weight_angle", weight_alignment_angles(rule))):
            out.update({f"{prefix}{name}_{i}": v for i, v in values.items() if i in layers})
    return out


# --------------------------------------------------------------------------------------------
# Gauss-Newton-target angles, null-space shares, parameter-space Gauss-Newton (Meulemans et al. 2020)
# --------------------------------------------------------------------------------------------


def damped_gn_activation_updates(J: Tensor, e: Tensor, damping: float) -> Tensor:
    """``Delta h_b = J_b^T (J_b J_b^T + lambda I)^{-1} e_b`` per sample: the damped Gauss-Newton step on ``h_i``.

    The damped Gauss-Newton targets of Meulemans et al. 2020 (NeurIPS, section 3: the damped pseudo-inverse
    ``J^T (J J^T + lambda I)^{-1}``), as the authors' ``compute_damped_gn_update`` computes them per sample
    (``lib/utils.py``, ``lib/dtp_layers.py`` ``compute_gn_activation_updates`` of
    github.com/meulemansalex/theoretical_framework_for_target_propagation); ``lambda = 0`` takes the pseudo-inverse
    ``J_b^dagger e_b`` (``torch.linalg.pinv``). Computed in the inputs' dtype (pass float64).

    Args:
        J: per-sample Jacobians ``J_b = dh_L/dh_i``, ``(B, n_L, n_i)``.
        e: output errors ``e_b = dL/dh_L``, ``(B, n_L)``.
        damping: ``lambda >= 0``.

    Returns:
        ``(B, n_i)``.

    >>> J = torch.tensor([[[2.0, 0.0]]], dtype=torch.float64)  # one sample, n_L = 1, n_i = 2
    >>> damped_gn_activation_updates(J, torch.tensor([[4.0]], dtype=torch.float64), 0.0).tolist()  # J^dagger e
    [[2.0, 0.0]]
    >>> damped_gn_activation_updates(J, torch.tensor([[4.0]], dtype=torch.float64), 4.0).tolist()  # 2 * 4 / (4 + 4)
    [[1.0, 0.0]]
    """
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if damping == 0:
        return (torch.linalg.pinv(J) @ e.unsqueeze(-1)).squeeze(-1)
    n = J.shape[-2]
    C = J @ J.transpose(-1, -2) + damping * torch.eye(n, dtype=J.dtype, device=J.device)
    return (J.transpose(-1, -2) @ torch.linalg.solve(C, e.unsqueeze(-1))).squeeze(-1)


def angle_degrees(a: Tensor, b: Tensor) -> Tensor:
    """Angle in degrees between two tensors, both flattened: ``arccos(<a, b> / (||a|| ||b||))`` (0-d; NaN if one is 0).

    >>> round(float(angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))), 3)
    45.0
    """
    a, b = a.reshape(-1), b.reshape(-1).to(a.dtype)
    cos = (a @ b) / (a.norm() * b.norm())
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def _network64(rule, what: str):
    """A float64 copy of ``rule.net`` (dense layers, no batch normalisation; else ``ValueError`` naming ``what``)."""
    other = [f"{k} ({type(layer).__name__})" for k, layer in enumerate(rule.net.layers, start=1) if not isinstance(layer, Dense)]
    if other:
        raise ValueError(f"{what} needs dense layers; layers {', '.join(other)} are not")
    if getattr(rule, "normalization", None) is not None:
        raise ValueError(f"{what} needs a rule without batch_norm (its layers see normalised inputs)")
    net = copy.deepcopy(rule.net).double()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def output_jacobians(net, i: int, h_i: Tensor) -> Tensor:
    """Per-sample Jacobians ``J_b = do_b/dh_{i,b}`` of the model output ``o`` (``h_L``; the logits of a linear output)
    with respect to hidden layer ``i``, batched with :func:`torch.func.vmap` over :func:`torch.func.jacrev`.

    Args:
        net: a :class:`~tplightning.layers.Network` (the diagnostics pass a float64 copy).
        i: hidden layer, ``1..L-1``.
        h_i: its activations, ``(B, n_i)``.

    Returns:
        ``(B, n_out, n_i)``.

    >>> from tplightning.layers import Network, Dense
    >>> net = Network([Dense(2, 3, activation="linear"), Dense(3, 2, activation="linear")])
    >>> torch.equal(output_jacobians(net, 1, torch.randn(4, 3))[2], net.layers[1].weight)
    True
    """
    upper = list(net.layers)[i:]

    def f(h: Tensor) -> Tensor:
        h = h.unsqueeze(0)
        for layer in upper:
            h = layer(h)
        return net.model_output(h).squeeze(0)

    return torch.func.vmap(torch.func.jacrev(f))(h_i)


def gnt_weight_updates(net, x: Tensor, e: Tensor, dampings: dict[int, float]) -> dict[int, Tensor]:
    """``Delta W^GNT_i = (2/B) sum_b (s_i'(a_{i,b}) * Delta h_{i,b}) h_{i-1,b}^T`` for the layers in ``dampings``.

    The weight update the damped Gauss-Newton targets ``h_i + Delta h_i`` (:func:`damped_gn_activation_updates`,
    ``lambda = dampings[i]``) give through the local loss (Meulemans et al. 2020; the authors' ``compute_gnt_updates``,
    ``lib/dtp_layers.py``, with its factor 2 and the sign of a gradient, ``e = dL/do``). All in ``net``'s dtype.

    Args:
        net: a dense :class:`~tplightning.layers.Network` (float64 for the diagnostics).
        x: input batch ``(B, n_0)``.
        e: ``dL/do`` per sample, ``(B, n_out)``.
        dampings: ``{i: lambda_i}`` for hidden layers ``i``.

    Returns:
        ``{i: (n_i, n_{i-1})}``.

    >>> from tplightning.layers import Network, Dense
    >>> net = Network([Dense(2, 2, activation="linear"), Dense(2, 1, activation="linear")]).double()
    >>> x, e = torch.eye(2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
    >>> torch.allclose(gnt_weight_updates(net, x, e, {1: 0.0})[1], torch.linalg.pinv(net.layers[1].weight.detach()))
    True
    """
    return {i: updates[0] for i, updates in _gnt_weight_updates_grid(net, x, e, {i: [lam] for i, lam in dampings.items()}).items()}


def _gnt_weight_updates_grid(net, x: Tensor, e: Tensor, grids: dict[int, Sequence[float]]) -> dict[int, list[Tensor]]:
    """:func:`gnt_weight_updates` for several dampings per layer, the Jacobians computed once."""
    with torch.no_grad():
        hs, pre = net.forward_all(x.to(e.dtype))
    out = {}
    for i, lams in grids.items():
        J = output_jacobians(net, i, hs[i])
        d = net.layers[i - 1].derivative(pre[i - 1], hs[i])
        out[i] = [F.delta_update(2 * d * damped_gn_activation_updates(J, e, lam), hs[i - 1]) for lam in lams]
    return out


def rule_weight_updates(rule, x: Tensor, y: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
    """The weight gradients the rule's forward update hands its optimizer for ``(x, y)``, ``{i: grad W_i}``.

    The rule's own forward pass, targets (:meth:`targets_from`) and local gradients (:meth:`forward_grads`, eq. 4.12)
    at its current weights, in its dtype: the update a training step on this batch takes (before the optimizer's
    rescaling, e.g. Adam's; the authors compare the same ``weights.grad``). Changes no weight, buffer or generator.

    >>> import tplightning as tp
    >>> rule = tp.DRL(sizes=[3, 4, 4, 2])
    >>> {i: tuple(g.shape) for i, g in rule_weight_updates(rule, torch.randn(5, 3), torch.randn(5, 2), [1, 2]).items()}
    {1: (4, 3), 2: (4, 4)}
    """
    with torch.no_grad():
        hs, pre = forward_pass(rule, x)
        targets = rule.targets_from(hs, pre, y, min(layers))
        grads = rule.forward_grads(list(layers), hs, pre, targets)
    return {i: grads[rule.net.layers[i - 1].weight] for i in layers}


def _output_error64(rule, net, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        o = net(x.double())
    return rule.loss.error(o, y if not y.is_floating_point() else y.double())


def gnt_angles(rule, x: Tensor, y: Tensor, dampings: Sequence[float] | float) -> dict[int, Tensor]:
    """Angle in degrees between each hidden layer's weight update and the Gauss-Newton-target update (the GNT angle).

    Meulemans et al. 2020's measure (figs. 3-4, S4; the authors' ``compute_gnt_angle``, ``lib/networks.py``): the
    rule's update (:func:`rule_weight_updates`) against ``Delta W^GNT_i`` (:func:`gnt_weight_updates`) with
    ``J_b = do/dh_i`` per sample (:func:`output_jacobians`), ``e = dL/do`` (``o`` the logits; the loss' own
    :meth:`~tplightning.losses.Loss.error`), all Jacobians and solves in float64 (the rule's update is cast to it).

    Args:
        rule: a target-propagation rule with dense layers and no batch normalisation.
        x: input batch ``(B, n_0)``.
        y: its labels.
        dampings: ``lambda_i`` per hidden layer (a list of ``L-1`` values) or one for all.

    Returns:
        ``{i: angle}`` for ``i = 1..L-1``, float64.

    >>> import tplightning as tp
    >>> rule = tp.DRL(sizes=[3, 4, 4, 2])
    >>> sorted(gnt_angles(rule, torch.randn(5, 3), torch.randn(5, 2), [1.0, 0.0]))
    [1, 2]
    """
    L = rule.num_layers
    lams = [float(dampings)] * (L - 1) if isinstance(dampings, (int, float)) else [float(v) for v in dampings]
    if len(lams) != L - 1:
        raise ValueError(f"dampings needs one value per hidden layer ({L - 1}), got {len(lams)}")
    net = _network64(rule, "the GNT angle")
    gnt = gnt_weight_updates(net, x, _output_error64(rule, net, x, y), dict(enumerate(lams, start=1)))
    ours = rule_weight_updates(rule, x, y, list(gnt))
    return {i: angle_degrees(gnt[i], ours[i].double()) for i in gnt}


#: the authors' damping grid (``gn_damping_hpsearch``, ``lib/train.py``): 0 and 1e-5 ... 10
DAMPING_GRID = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def damping_search(rule, batches, grid: Sequence[float] = DAMPING_GRID) -> tuple[list[float], Tensor]:
    """The damping ``lambda_i`` per hidden layer whose GNT angle, averaged over ``batches``, is smallest.

    Meulemans et al. 2020 choose the damping of the GNT angle per method and per layer this way (the authors'
    ``gn_damping_hpsearch``, ``lib/train.py``, after epoch 2 with the forward weights frozen, the GNT angle on every
    80th batch, 0 and 1e-5 ... 10). Nothing is trained here: the weights stay as they are, so the forward (and
    feedback) weights are frozen by construction. The Jacobians of each batch are computed once for the whole grid.

    Args:
        rule: a target-propagation rule with dense layers and no batch normalisation.
        batches: an iterable of ``(x, y)``.
        grid: the dampings tried.

    Returns:
        ``([lambda_1, ..., lambda_{L-1}], mean_angles)``, ``mean_angles`` of shape ``(len(grid), L-1)`` in degrees;
        a tie goes to the first value of ``grid``.

    >>> import tplightning as tp
    >>> rule = tp.DRL(sizes=[3, 4, 4, 2])
    >>> lams, table = damping_search(rule, [(torch.randn(5, 3), torch.randn(5, 2))], grid=[0.0, 1.0])
    >>> len(lams), tuple(table.shape), all(lam in (0.0, 1.0) for lam in lams)
    (2, (2, 2), True)
    """
    grid = [float(v) for v in grid]
    if not grid or any(not v >= 0 for v in grid):
        raise ValueError(f"grid must hold dampings >= 0, got {grid}")
    hidden = list(range(1, rule.num_layers))
    total, n = torch.zeros(len(grid), len(hidden), dtype=torch.float64), 0
    for x, y in batches:
        net = _network64(rule, "the damping search")
        gnt = _gnt_weight_updates_grid(net, x, _output_error64(rule, net, x, y), {i: grid for i in hidden})
        ours = rule_weight_updates(rule, x, y, hidden)
        for c, i in enumerate(hidden):
            total[:, c] += torch.stack([angle_degrees(u, ours[i].double()) for u in gnt[i]])
        n += 1
    if n == 0:
        raise ValueError("damping_search needs at least one batch")
    mean = total / n
    return [grid[int(k)] for k in mean.argmin(0)], mean


def _weight_jacobians(net, x: Tensor) -> list[Tensor]:
    """``[dO/dW_1, ..., dO/dW_L]`` of the batch's flattened outputs ``O`` (``(B n_out,)``), each ``(B n_out, numel W_k)``."""
    names = [f"layers.{k}.weight" for k in range(len(net.layers))]
    weights = {n: dict(net.named_parameters())[n] for n in names}

    def outputs(ws: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(net, ws, (x.double(),), strict=False).reshape(-1)

    J = torch.func.jacrev(outputs)(weights)
    return [J[n].reshape(J[n].shape[0], -1) for n in names]


def null_space_shares(rule, x: Tensor, y: Tensor, layers: Sequence[int] | None = None) -> dict[int, Tensor]:
    """Share of each layer's weight update in the null space of the output's Jacobian with respect to its weights.

    Meulemans et al. 2020, fig. 2 (the authors' ``compute_nullspace_relative_norm`` and ``nullspace_relative_norm``,
    ``lib/dtp_layers.py``, ``lib/utils.py``): with ``J_i = dO/dvec(W_i)`` (``O`` the batch's outputs, flattened) and
    ``u = vec(rule's update of W_i)``, the share is ``||u - J_i^dagger J_i u|| / ||u||``: the part of the update that
    does not change the output of this batch at all. The authors take the null space from an SVD with an absolute
    tolerance ``1e-12``; here it is the complement of ``J_i``'s row space by ``torch.linalg.pinv`` (its default relative
    tolerance), in float64. Cost: ``J_i`` has ``B n_out`` rows and ``n_i n_{i-1}`` columns (small networks).

    Args:
        rule: a target-propagation rule with dense layers and no batch normalisation.
        x: input batch ``(B, n_0)``.
        y: its labels.
        layers: layers ``1..L`` to report (``None``: the hidden layers ``1..L-1``).

    >>> import tplightning as tp
    >>> rule = tp.DRL(sizes=[3, 4, 4, 2])
    >>> shares = null_space_shares(rule, torch.randn(1, 3), torch.randn(1, 2))
    >>> sorted(shares), all(0 <= float(s) <= 1 for s in shares.values())
    ([1, 2], True)
    """
    L = rule.num_layers
    layers = list(range(1, L)) if layers is None else [int(i) for i in layers]
    net = _network64(rule, "the null-space share")
    Js = _weight_jacobians(net, x)
    ours = rule_weight_updates(rule, x, y, layers)
    out = {}
    for i in layers:
        J, u = Js[i - 1], ours[i].double().reshape(-1)
        row = torch.linalg.pinv(J) @ (J @ u)
        out[i] = (u - row).norm() / u.norm()
    return out


def gauss_newton_angles(rule, x: Tensor, y: Tensor, damping: float = 0.0) -> dict[int, Tensor]:
    """Angles in degrees between the rule's weight updates and the parameter-space Gauss-Newton update of all weights.

    ``Delta theta^GN = J_theta^T (J_theta J_theta^T + lambda I)^{-1} e`` with ``J_theta = dO/dtheta`` over all layers'
    weights (``O`` the batch's outputs, flattened; ``e = dL/dO``; :func:`damped_gn_activation_updates` with one
    "sample" of ``B n_out`` outputs; ``lambda = 0``: the minimum-norm step ``J_theta^dagger e``, the thesis' Gauss-Newton
    of section 4.2 on parameters). Key ``i`` (``1..L-1``): the angle between layer ``i``'s block of ``Delta theta^GN``
    and its update; key ``0``: between the hidden layers' updates concatenated and those blocks concatenated. (The
    authors' ``compute_gn_angles`` takes each layer's own block Jacobian instead: block-diagonal Gauss-Newton.) Cost:
    ``J_theta`` has ``B n_out`` rows and as many columns as weights: small networks only.

    >>> import tplightning as tp
    >>> rule = tp.DRL(sizes=[3, 4, 4, 2])
    >>> sorted(gauss_newton_angles(rule, torch.randn(5, 3), torch.randn(5, 2)))
    [0, 1, 2]
    """
    L = rule.num_layers
    net = _network64(rule, "the Gauss-Newton angle")
    Js = _weight_jacobians(net, x)
    J = torch.cat(Js, dim=1)
    e = _output_error64(rule, net, x, y).reshape(1, -1)
    step = damped_gn_activation_updates(J.unsqueeze(0), e, damping).squeeze(0)
    blocks = step.split([j.shape[1] for j in Js])
    hidden = list(range(1, L))
    ours = rule_weight_updates(rule, x, y, hidden)
    out = {i: angle_degrees(blocks[i - 1], ours[i].double()) for i in hidden}
    out[0] = angle_degrees(torch.cat([blocks[i - 1] for i in hidden]), torch.cat([ours[i].double().reshape(-1) for i in hidden]))
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------------


class TargetPropDiagnostics(pl.Callback):
    """Log the thesis' learning-signal diagnostics of a target-propagation rule during training.

    Every ``every_n_steps`` training batches (counted by the callback, the first batch included),
    on the first ``max_samples`` rows of the batch, after the rule's update, it logs for each
    hidden layer ``i`` (see :func:`summarize`): ``diag/cos_tp_i``, ``diag/cos_gn_i``,
    ``diag/cos_bp_i``, ``diag/norm_signal_i``, ``diag/norm_tp_i``, ``diag/norm_approx_i``,
    ``diag/norm_rec_i``, ``diag/rec_error_i``, for thesis-form learned rules
    ``diag/q_pinv_error_i`` (``||Q_i - W_{i+1}^dagger||_F``) and for FA/DFA ``diag/weight_angle_i`` (degrees between
    ``B_i`` and ``W_{i+1}^T``, :func:`weight_alignment_angles`). Reads only: no weight, optimizer or
    generator state changes, so training is identical with and without it. A no-op for BP rules.

    Optional, off by default (Meulemans et al. 2020's measures; dense networks without batch normalisation), measured
    on the same rows *before* the rule's update of the batch, so the update compared is the one the step takes (the
    authors measure at the same point), and only in batches that update the forward weights (not in feedback-only
    epochs):

    * ``gnt_damping``: ``diag/gnt_angle_i`` (degrees, :func:`gnt_angles`), ``lambda_i`` per hidden layer. Cost per
      diagnostic step: ``B`` per-sample Jacobians ``n_out x n_i`` per layer (``n_out`` reverse passes through the
      layers above, vectorised over the batch), a float64 copy of the network and ``B`` solves of ``n_out x n_out``
      systems; about a forward-backward pass of the network ``n_out`` times per hidden layer.
    * ``null_space``: ``diag/null_share_i`` (:func:`null_space_shares`, fig. 2). Cost: the Jacobian of the batch's
      ``B n_out`` outputs with respect to all weights and one pseudo-inverse per layer of a ``B n_out x n_i n_{i-1}``
      matrix: small networks only.
    * ``gauss_newton``: ``diag/gn_angle_i`` and ``diag/gn_angle_all`` (:func:`gauss_newton_angles`, damping
      ``gn_damping``). Cost: the same Jacobian and one pseudo-inverse (or solve) of ``B n_out x P`` (``P`` all
      weights): small networks only.

    ``signals=False`` skips the thesis' diagnostics above (then only the optional measures are logged);
    ``forward_batches_only`` counts (and measures) only the batches of epochs that train the forward weights, so
    ``every_n_steps`` counts forward steps (the authors' ``log_interval``) and ``step`` in :attr:`history` is the
    forward step.

    Values go to ``trainer.callback_metrics`` through ``pl_module.log`` (``on_step``, progress bar
    off) and to the loggers directly at every diagnostic step (Lightning's own logging would keep
    only those on ``log_every_n_steps``), so none is lost. With ``keep_history`` the floats are also kept
    in :attr:`history` (``[{"step", "epoch", key: value, ...}]``), which the experiments average.

    Args:
        every_n_steps: batches between two diagnostics.
        max_samples: rows of the batch used (bounds the cost).
        layers: hidden layers to report (1-based; ``None``: all ``1..L-1``).
        keep_history: keep every logged value in :attr:`history`.
        signals: log the thesis' learning-signal diagnostics.
        gnt_damping: ``lambda_i`` of the GNT angle, one per hidden layer or one for all (``None``: off).
        null_space: log the null-space shares.
        gauss_newton: log the angles to the parameter-space Gauss-Newton update.
        gn_damping: the damping of that update.
        forward_batches_only: count only the batches that train the forward weights.

    >>> import tplightning as tp
    >>> diag = TargetPropDiagnostics(every_n_steps=1, max_samples=8, gnt_damping=[1.0])
    >>> trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[diag])
    >>> trainer.fit(tp.DTPAI(sizes=[6, 6, 6]), datamodule=tp.StudentTeacherDataModule(num_train=64))
    >>> [h["step"] for h in diag.history], round(diag.history[0]["diag/cos_tp_1"], 3), "diag/gnt_angle_1" in diag.history[0]
    ([0, 1], 1.0, True)
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        max_samples: int = 64,
        layers: Sequence[int] | None = None,
        keep_history: bool = True,
        signals: bool = True,
        gnt_damping: Sequence[float] | float | None = None,
        null_space: bool = False,
        gauss_newton: bool = False,
        gn_damping: float = 0.0,
        forward_batches_only: bool = False,
    ):
        if every_n_steps < 1 or max_samples < 1:
            raise ValueError(f"every_n_steps and max_samples must be >= 1, got {every_n_steps} and {max_samples}")
        lams = [] if gnt_damping is None else [gnt_damping] if isinstance(gnt_damping, (int, float)) else list(gnt_damping)
        if any(not float(v) >= 0 for v in lams) or not gn_damping >= 0:
            raise ValueError(f"gnt_damping and gn_damping must be >= 0, got {gnt_damping} and {gn_damping}")
        self.every_n_steps, self.max_samples = int(every_n_steps), int(max_samples)
        self.layers = None if layers is None else [int(i) for i in layers]
        self.keep_history = keep_history
        self.signals = bool(signals)
        self.gnt_damping = None if gnt_damping is None else float(gnt_damping) if isinstance(gnt_damping, (int, float)) else [float(v) for v in gnt_damping]
        self.null_space, self.gauss_newton, self.gn_damping = bool(null_space), bool(gauss_newton), float(gn_damping)
        self.forward_batches_only = bool(forward_batches_only)
        self.history: list[dict] = []
        self._batches = 0
        self._before: dict[str, Tensor] = {}

    def _counted(self, pl_module) -> bool:
        forward = getattr(pl_module, "trains_forward", None)
        return not self.forward_batches_only or forward is None or forward(pl_module.current_epoch)

    def _due(self, pl_module) -> bool:
        return self._batches % self.every_n_steps == 0 and is_target_prop(pl_module) and self._counted(pl_module)

    def _layers(self, pl_module) -> list[int]:
        L = pl_module.num_layers
        return list(range(1, L)) if self.layers is None else [i for i in self.layers if 1 <= i < L]

    def before_update(self, pl_module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """The optional measures (GNT angles, null-space shares, Gauss-Newton angles) for the batch ``(x, y)``."""
        forward = getattr(pl_module, "trains_forward", None)
        if forward is not None and not forward(pl_module.current_epoch):
            return {}
        layers, out = self._layers(pl_module), {}
        if self.gnt_damping is not None:
            out.update({f"diag/gnt_angle_{i}": v for i, v in gnt_angles(pl_module, x, y, self.gnt_damping).items() if i in layers})
        if self.null_space:
            out.update({f"diag/null_share_{i}": v for i, v in null_space_shares(pl_module, x, y, layers).items()})
        if self.gauss_newton:
            for i, v in gauss_newton_angles(pl_module, x, y, self.gn_damping).items():
                if i == 0 or i in layers:
                    out[f"diag/gn_angle_{'all' if i == 0 else i}"] = v
        return out

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._before = {}
        if self._due(pl_module) and (self.gnt_damping is not None or self.null_space or self.gauss_newton):
            self._before = self.before_update(pl_module, batch[0][: self.max_samples], batch[1][: self.max_samples])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._counted(pl_module):
            return
        due = self._due(pl_module)
        self._batches += 1
        if not due:
            return
        x, y = batch[0][: self.max_samples], batch[1][: self.max_samples]
        values = diagnostics(pl_module, x, y, self.layers) if self.signals else {}
        values.update(self._before)
        self._before = {}
        if not values:
            return
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=x.shape[0], logger=False)
        floats = {k: float(v) for k, v in values.items()}
        for logger in trainer.loggers:  # every diagnostic step, not only those on Lightning's log_every_n_steps
            logger.log_metrics(floats, step=trainer.global_step)
        if self.keep_history:
            self.history.append({"step": self._batches - 1, "epoch": trainer.current_epoch, **floats})

    def state_dict(self) -> dict:
        """The batch count, so a resumed run keeps the ``every_n_steps`` rhythm."""
        return {"batches": self._batches}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the batch count of :meth:`state_dict`."""
        self._batches = int(state_dict.get("batches", 0))
