"""Learning rules, one LightningModule family per file on the shared :class:`LearningRule` base."""
from .backprop import BP, BPFixed
from .base import DivergenceError, LearningRule
from .exact import RMTPEI, RTPEI, TPEI, ExactInverseRule
from .target_prop import TargetPropRule

__all__ = ["LearningRule", "DivergenceError", "BP", "BPFixed", "TargetPropRule", "ExactInverseRule", "TPEI", "RTPEI", "RMTPEI"]
