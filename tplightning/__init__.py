"""tplightning: target-propagation learning rules as PyTorch Lightning modules.

Implements A. Meulemans, *Towards a mathematical understanding of biologically plausible
learning methods for deep neural networks* (MSc thesis, KU Leuven, 2019). Every rule and data
module is importable from here, which LightningCLI short names and ``load_from_checkpoint`` need.

A rule is a ``LightningModule``; fit it with any Lightning trainer. DTP-AI (difference targets through
learned inverses, Alg. A.12) on a small student-teacher problem (section 5.2.2):

>>> import functools, torch
>>> import tplightning as tp
>>> from tplightning._lightning import pl  # the Lightning package tplightning chose (pytorch_lightning by default)
>>> _ = pl.seed_everything(0, verbose=False)
>>> rule = tp.DTPAI(sizes=[6, 6, 6], forward_optimizer=functools.partial(torch.optim.SGD, lr=0.01))
>>> data = tp.StudentTeacherDataModule(sizes=[6, 6, 6], num_train=64, num_val=32, num_test=32)
>>> trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
...                      enable_progress_bar=False, enable_model_summary=False)
>>> before = rule.net.weights[0].detach().clone()
>>> trainer.fit(rule, datamodule=data)
>>> bool((rule.net.weights[0] != before).any()), tuple(rule(torch.zeros(3, 6)).shape)
(True, (3, 6))
"""
from . import blocks, functional, layers, networks, selection, target_maps
from .blocks import Block, convert
from .callbacks import Checkpoint, InitNearTeacher, ReapplyOptimizerConfig
from .checkpoints import load
from .diagnostics import TargetPropDiagnostics
from .schedules import FeedbackSchedule
from .data import CIFAR10DataModule, MNISTDataModule, StudentTeacherDataModule, ToyDataModule
from .rules import *  # noqa: F401,F403
from .rules import __all__ as _rules
from .dynamics import DynamicalTP, MultiplexingDTP, TwoPhaseDTP  # noqa: F401 (chapter 6; not in __all__, see tplightning.dynamics)

__version__ = "0.1.0"
__all__ = ["blocks", "Block", "convert", "functional", "layers", "networks", "selection", "target_maps", "load", "Checkpoint", "ReapplyOptimizerConfig", "InitNearTeacher", "TargetPropDiagnostics", "FeedbackSchedule", "StudentTeacherDataModule", "ToyDataModule", "MNISTDataModule", "CIFAR10DataModule", *_rules]
