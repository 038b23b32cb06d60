"""tplightning: target-propagation learning rules as PyTorch Lightning modules.

Implements A. Meulemans, *Towards a mathematical understanding of biologically plausible
learning methods for deep neural networks* (MSc thesis, KU Leuven, 2019). Every rule and data
module is importable from here, which LightningCLI short names and ``load_from_checkpoint`` need.
"""
from . import functional, layers, networks, selection, target_maps
from .callbacks import Checkpoint, InitNearTeacher, ReapplyOptimizerConfig
from .checkpoints import load
from .diagnostics import TargetPropDiagnostics
from .data import CIFAR10DataModule, MNISTDataModule, StudentTeacherDataModule, ToyDataModule
from .rules import *  # noqa: F401,F403
from .rules import __all__ as _rules
from .dynamics import DynamicalTP, MultiplexingDTP, TwoPhaseDTP  # noqa: F401 (chapter 6; not in __all__, see tplightning.dynamics)

__version__ = "0.1.0"
__all__ = ["functional", "layers", "networks", "selection", "target_maps", "load", "Checkpoint", "ReapplyOptimizerConfig", "InitNearTeacher", "TargetPropDiagnostics", "StudentTeacherDataModule", "ToyDataModule", "MNISTDataModule", "CIFAR10DataModule", *_rules]
