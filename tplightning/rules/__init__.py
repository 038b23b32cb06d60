"""Learning rules, one LightningModule family per file on the shared :class:`LearningRule` base."""
from .alignment import BDFA, BRSF, DFA, FA, FRSF, KP, USF, WM
from .backprop import BP, BPFixed
from .base import DivergenceError, LearningRule
from .drl import DRL, LDRL, DDTPLinear
from .gauss_newton import GaussNewton
from .exact import DTPEI, RMTPEI, RTPEI, TPEI, ExactInverseRule
from .learned import AOSDTP, DTPAI, MTP, RDTPAI, RTPAI, TPAI, LearnedInverseRule, LeeDTP, OriginalDTP, OriginalRDTP, OriginalRTP, OriginalTP
from .target_prop import TargetPropRule

__all__ = [
    "LearningRule", "DivergenceError", "BP", "BPFixed", "FA", "DFA", "BDFA", "USF", "BRSF", "FRSF", "KP", "WM", "TargetPropRule", "ExactInverseRule", "TPEI", "RTPEI", "RMTPEI", "DTPEI",
    "LearnedInverseRule", "TPAI", "RTPAI", "DTPAI", "RDTPAI", "OriginalTP", "OriginalRTP", "OriginalDTP", "OriginalRDTP", "LeeDTP", "AOSDTP", "MTP",
    "DRL", "DDTPLinear", "LDRL", "GaussNewton",
]
from .fw_dtp import FWDTP  # noqa: E402 (issue 31)
from .ccl import CCL  # noqa: E402 (issue 31)

__all__ += ["FWDTP", "CCL"]
