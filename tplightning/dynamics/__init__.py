"""Dynamical target propagation in networks of pyramidal neurons (thesis chapter 6).

- :mod:`.models`: the single-phase mixture network (:class:`MixtureNetwork`, eqs. 6.1-6.26), the
  two-phase network (:class:`TwoPhaseNetwork`, section 6.6) and the multiplexing network
  (:class:`MultiplexingNetwork`, section 6.9.2), each with ``equilibrium``, ``trajectory`` and its
  weight dynamics.
- :mod:`.theory`: the first-order predictions (eqs. 6.15, 6.22, 6.31/6.33, 6.53/6.57).
- :mod:`.stability`: the Jacobian of eq. 6.40, its spectrum, the check of section 6.7.
- :mod:`.modules`: LightningModules :class:`DynamicalTP`, :class:`TwoPhaseDTP`, :class:`MultiplexingDTP`.
"""
from .models import ConvergenceError, MixtureNetwork, MultiplexingNetwork, TwoPhaseNetwork, nudged_target, short_circuit
from .modules import DynamicalTP, MultiplexingDTP, TwoPhaseDTP

__all__ = [
    "ConvergenceError", "MixtureNetwork", "TwoPhaseNetwork", "MultiplexingNetwork", "nudged_target", "short_circuit",
    "DynamicalTP", "TwoPhaseDTP", "MultiplexingDTP",
]
