"""Feedback alignment presets: FA (thesis 3.2.1, Lillicrap et al. 2016) and DFA (3.2.2, Noekland 2016).

Both are target-propagation rules whose maps carry fixed random feedback matrices
(:class:`~tplightning.target_maps.FeedbackAlignment`, :class:`~tplightning.target_maps.DirectFeedback`): the propagated
"targets" are ``h_i`` plus ``eta^`` times the FA/DFA error signal, and the local update ``D_i (h_i - h^_i) h_{i-1}^T``
is then eq. 3.20's. ``target_stepsize`` defaults to 1 here, so the forward learning rate means what it means for BP.
Bidirectional FA (3.2.4, trained feedback weights) and broadcast FA (3.2.3, spiking neurons) are not implemented.
"""
from __future__ import annotations

from torch import Tensor

from ..target_maps import DirectFeedback, FeedbackAlignment
from .target_prop import TargetPropRule

__all__ = ["FA", "DFA"]


class FA(TargetPropRule):
    """Feedback alignment: ``delta_i = D_{s_i} B_i delta_{i+1}`` with fixed random ``B_i`` of shape ``(n_i, n_{i+1})`` (eq. 3.18).

    ``B_i`` are drawn with std ``1/sqrt(n_{i+1})`` after the forward weights (``seed_everything`` sets both) and kept in
    the checkpoint. Run: ``python train.py --config fa.yaml``.

    Args:
        target_stepsize: ``eta^`` of the output target; 1 makes the update the FA gradient itself.
        **kwargs: the arguments of :class:`~tplightning.rules.target_prop.TargetPropRule`.
    """

    def __init__(self, *args, target_stepsize: float = 1.0, **kwargs):
        super().__init__(*args, target_stepsize=target_stepsize, **kwargs)

    def make_maps(self):
        return [FeedbackAlignment() for _ in range(self.num_layers - 1)]

    @property
    def feedback_weights(self) -> list[Tensor]:
        """The fixed feedback matrices ``[B_1, ..., B_{L-1}]``."""
        return [m.B for m in self.maps]


class DFA(FA):
    """Direct feedback alignment: ``delta_i = D_{s_i} B~_i delta_L`` with fixed random ``B~_i`` of shape ``(n_i, n_L)`` (eq. 3.21).

    Run: ``python train.py --config dfa.yaml``.
    """

    def make_maps(self):
        return [DirectFeedback(self.net.layers[-1]) for _ in range(self.num_layers - 1)]
