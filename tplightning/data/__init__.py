"""Data modules: student-teacher regression, the thesis' toy problem, MNIST, CIFAR-10."""
from .base import EpochSeededSampler, TensorData, TensorDataModule
from .student_teacher import StudentTeacherDataModule
from .mnist import MNISTDataModule
from .cifar10 import CIFAR10DataModule
from .toy import ToyDataModule

__all__ = ["EpochSeededSampler", "TensorData", "TensorDataModule", "StudentTeacherDataModule", "ToyDataModule", "MNISTDataModule", "CIFAR10DataModule"]
