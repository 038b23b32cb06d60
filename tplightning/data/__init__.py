"""Data modules: student-teacher regression, the thesis' toy problem, MNIST, CIFAR-10.

Each is a ``LightningDataModule`` whose splits are tensors in memory (:class:`TensorDataModule`), with
``input_dim``, ``output_dim`` and ``task`` for the rules to check against.

>>> from tplightning.data import StudentTeacherDataModule
>>> data = StudentTeacherDataModule(sizes=[6, 6, 6], num_train=64, num_val=8, num_test=8)
>>> data.setup()
>>> x, y = next(iter(data.train_dataloader()))
>>> tuple(x.shape), tuple(y.shape), data.task
((32, 6), (32, 6), 'regression')
"""
from .base import EpochSeededSampler, TensorData, TensorDataModule
from .student_teacher import StudentTeacherDataModule
from .mnist import MNISTDataModule
from .cifar10 import CIFAR10DataModule
from .toy import ToyDataModule

__all__ = ["EpochSeededSampler", "TensorData", "TensorDataModule", "StudentTeacherDataModule", "ToyDataModule", "MNISTDataModule", "CIFAR10DataModule"]
