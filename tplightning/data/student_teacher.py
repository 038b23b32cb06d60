"""Student-teacher regression (thesis sections 5.1.3 and 5.2.2)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..networks import MLP
from ..errors import ConfigError
from .base import TensorData, TensorDataModule, derive_seed

__all__ = ["StudentTeacherDataModule"]


class StudentTeacherDataModule(TensorDataModule):
    """A random teacher MLP labels Gaussian inputs; a student of the same architecture learns it.

    Items are ``(x, teacher(x))`` with ``x ~ N(0, input_std^2 I)`` and the teacher an :class:`~tplightning.networks.MLP`
    ``h_i = s_i(W_i* h_{i-1})`` without biases. The three splits are drawn once, in :meth:`setup`, from one generator
    seeded by ``teacher_seed`` (so the same seed gives the same data); the teacher's weights come from another
    stream of the same seed (:func:`~tplightning.data.base.derive_seed`).

    The thesis' settings: 6-6-6 (one hidden layer), the contracting 6-6-4 and the deep
    6-6-6-6-6-6, leaky-ReLU 0.35 hidden layers and a linear output, teacher weights standard
    Gaussian. Batch size 1 with 2000 batches per epoch (section 5.1.3, exact inverses) or batch
    size 32 with 60 batches per epoch (section 5.2.2). The teacher's weights are exposed as
    :attr:`teacher_weights`; :class:`~tplightning.callbacks.InitNearTeacher` places a student at a
    given Frobenius distance from them.

    Args:
        sizes: teacher layer sizes ``[n_0, ..., n_L]`` (the student's ``sizes`` must match).
        teacher_activation: teacher hidden non-linearity. Named apart from the model's
            ``activation``: the teacher is part of the problem, the student's non-linearity may
            differ (and Lightning refuses a run whose model and data hyper-parameters share a
            name with different values).
        teacher_output_activation: teacher output non-linearity.
        teacher_negative_slope: the teacher's leaky-ReLU slope.
        teacher_std: std of the teacher's Gaussian weights (thesis: 1.0).
        teacher_seed: seed of the teacher's weights and of the inputs.
        num_train: training samples (batches per epoch = num_train / batch_size).
        num_val: validation samples.
        num_test: test samples.
        input_std: std of the Gaussian inputs.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        shuffle_seed: seed of the per-epoch shuffling.
        shuffle: shuffle the training set every epoch (off: fixed order).

    >>> import torch
    >>> data = StudentTeacherDataModule(sizes=[4, 3, 2], num_train=8, num_val=4, num_test=4)
    >>> data.setup()
    >>> x, y = data.train_data.x, data.train_data.y
    >>> data.input_dim, data.output_dim, tuple(x.shape), torch.equal(data.teacher(x), y)
    (4, 2, (8, 4), True)
    >>> [tuple(W.shape) for W in data.teacher_weights]
    [(3, 4), (2, 3)]
    """

    task = "regression"

    def __init__(
        self,
        sizes: Sequence[int] = (6, 6, 6),
        teacher_activation: str = "leaky_relu",
        teacher_output_activation: str = "linear",
        teacher_negative_slope: float = 0.35,
        teacher_std: float = 1.0,
        teacher_seed: int = 0,
        num_train: int = 1920,
        num_val: int = 500,
        num_test: int = 1000,
        input_std: float = 1.0,
        batch_size: int = 32,
        eval_batch_size: int = 1000,
        shuffle_seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__(batch_size, eval_batch_size, shuffle_seed, shuffle)
        for name, n in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if n < 1:
                raise ConfigError(f"{name} must be >= 1, got {n}")
        if not (isinstance(input_std, (int, float)) and 0 < input_std < float("inf")):
            raise ConfigError(f"input_std must be a finite number > 0 (0 draws constant inputs), got {input_std}")
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(derive_seed(teacher_seed, "teacher"))
        self.teacher = MLP(sizes, teacher_activation, teacher_output_activation, teacher_negative_slope, False, teacher_std, generator=g)
        self.teacher.requires_grad_(False)
        self.input_dim, self.output_dim = self.teacher.sizes[0], self.teacher.sizes[-1]
        self.num_train, self.num_val, self.num_test, self.input_std = num_train, num_val, num_test, input_std

    @property
    def teacher_weights(self) -> list[Tensor]:
        """The teacher's ``[W_1*, ..., W_L*]`` (copies)."""
        return [W.detach().clone() for W in self.teacher.weights]

    def setup(self, stage: str | None = None) -> None:
        """Draw the inputs of the three splits and label them with the teacher (once; later calls keep them)."""
        if self.train_data is not None:
            return
        g = torch.Generator().manual_seed(derive_seed(self.hparams.teacher_seed, "inputs"))
        splits = []
        for n in (self.num_train, self.num_val, self.num_test):
            x = torch.randn(n, self.input_dim, generator=g) * self.input_std
            with torch.no_grad():
                splits.append(TensorData(x, self.teacher(x)))
        self.train_data, self.val_data, self.test_data = splits
        self.check_splits()
