"""The thesis' toy problem (section 5.1.1, fig. 5.1): one input, two hidden, two outputs."""
from __future__ import annotations

import torch

from .base import derive_seed
from .student_teacher import StudentTeacherDataModule

__all__ = ["ToyDataModule"]


class ToyDataModule(StudentTeacherDataModule):
    """Scalar input ``h_0 ~ N(0, 1)``, a 1-2-2 teacher with hidden weights ``W_1*`` and output ``W_2``.

    The student shares ``W_2`` and learns only ``W_1`` (use ``train_layers: [1]`` on the rule and
    :class:`~tplightning.callbacks.InitNearTeacher` with ``copy_layers: [2]``). ``nonlinear=False``
    is the linear case (eqs. 5.1-5.12); ``nonlinear=True`` puts a leaky-ReLU with slope 0.1 on the
    hidden layer (eq. 5.13). Teacher: ``h_1 = s(W_1* h_0)``, ``h_2 = W_2 h_1`` (eqs. 5.1-5.2, no biases).

    The thesis assumes ``W_2`` invertible (after eq. 5.3) without saying how it is drawn. We draw the teacher's
    weights from standard Gaussians and redraw ``W_2`` until its smallest singular value is at least 0.3, so the
    exact inverse ``W_2^{-1}`` of the target-propagation step stays well conditioned.

    Args:
        nonlinear: leaky-ReLU(0.1) hidden layer instead of a linear one.
        teacher_seed: seed of ``W_1*``, ``W_2`` and the inputs.
        num_train: training samples.
        num_val: validation samples.
        num_test: test samples.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        shuffle_seed: seed of the per-epoch shuffling.

    >>> import torch
    >>> data = ToyDataModule(nonlinear=True, num_train=4, num_val=4, num_test=4)
    >>> data.setup()
    >>> data.teacher.sizes, tuple(data.train_data.x.shape), tuple(data.output_weights.shape)
    ([1, 2, 2], (4, 1), (2, 2))
    >>> bool(torch.linalg.svdvals(data.output_weights).min() >= 0.3)
    True
    """

    def __init__(
        self,
        nonlinear: bool = False,
        teacher_seed: int = 0,
        num_train: int = 256,
        num_val: int = 256,
        num_test: int = 1000,
        batch_size: int = 16,
        eval_batch_size: int = 1000,
        shuffle_seed: int = 0,
    ):
        super().__init__(
            sizes=(1, 2, 2),
            teacher_activation="leaky_relu" if nonlinear else "linear",
            teacher_output_activation="linear",
            teacher_negative_slope=0.1,
            teacher_seed=teacher_seed,
            num_train=num_train,
            num_val=num_val,
            num_test=num_test,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            shuffle_seed=shuffle_seed,
        )
        self.nonlinear = nonlinear
        # W_2 must be invertible for exact-inverse targets (eq. 5.3): redraw until well conditioned.
        g = torch.Generator().manual_seed(derive_seed(teacher_seed, "toy output weights"))
        W2 = self.teacher.weights[1]
        with torch.no_grad():
            while torch.linalg.svdvals(W2).min() < 0.3:
                W2.copy_(torch.randn(2, 2, generator=g))

    @property
    def output_weights(self):
        """The fixed ``W_2`` shared by teacher and student (a copy)."""
        return self.teacher_weights[1]
