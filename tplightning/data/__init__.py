"""Data modules: student-teacher regression, the thesis' toy problem, MNIST."""
from .base import EpochSeededSampler, TensorData, TensorDataModule
from .student_teacher import StudentTeacherDataModule
from .mnist import MNISTDataModule
from .toy import ToyDataModule

__all__ = ["EpochSeededSampler", "TensorData", "TensorDataModule", "StudentTeacherDataModule", "ToyDataModule", "MNISTDataModule"]
