"""Callbacks: place a student near its teacher (thesis 5.1.3 / 5.2.2)."""
from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from .data.base import derive_seed

__all__ = ["InitNearTeacher"]


class InitNearTeacher(pl.Callback):
    """Start the student at Frobenius distance ``distance`` from the teacher, per weight matrix.

    The thesis uses 8.0 ("removes the random luckiness" of the initialisation; about the mean
    distance between two 6x6 standard Gaussian matrices): ``W_i = W_i* + distance * R_i/||R_i||_F``
    with ``R_i`` Gaussian. Directions are redrawn (at most ``max_attempts`` times) until the rule
    accepts the matrix, e.g. until it is robustly invertible for exact-inverse rules. Layers in
    ``copy_layers`` (1-based) are copied from the teacher instead (the toy's shared ``W_2``).
    Runs in ``setup`` before a checkpoint is restored, so a resumed run keeps its loaded weights.

    Args:
        distance: Frobenius distance per weight matrix.
        seed: seed of the perturbation directions.
        copy_layers: layers set equal to the teacher's.
        max_attempts: redraws per layer before giving up with an error.
    """

    def __init__(self, distance: float = 8.0, seed: int = 0, copy_layers: Sequence[int] = (), max_attempts: int = 1000):
        if distance < 0:
            raise ValueError(f"distance must be >= 0, got {distance}")
        self.distance, self.seed, self.copy_layers, self.max_attempts = distance, seed, list(copy_layers), max_attempts

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule
        teacher = getattr(dm, "teacher_weights", None)
        if teacher is None:
            raise ValueError(f"InitNearTeacher needs a data module with teacher_weights, got {type(dm).__name__}")
        student = pl_module.forward_weights
        shapes = [tuple(W.shape) for W in student]
        if [tuple(W.shape) for W in teacher] != shapes:
            raise ValueError(
                f"student weight shapes {shapes} differ from the teacher's {[tuple(W.shape) for W in teacher]}"
            )
        g = torch.Generator().manual_seed(derive_seed(self.seed, "init near teacher"))
        new = []
        for i, Wt in enumerate(teacher, start=1):
            if i in self.copy_layers:
                new.append(Wt.clone())
                continue
            for _ in range(self.max_attempts):
                R = torch.randn(Wt.shape, generator=g, dtype=Wt.dtype)
                W = Wt + self.distance * R / R.norm()
                if pl_module.weight_is_acceptable(i, W):
                    break
            else:
                raise ValueError(
                    f"no acceptable weight matrix for layer {i} at distance {self.distance} from the teacher "
                    f"after {self.max_attempts} attempts"
                )
            new.append(W)
        pl_module.load_forward_weights([W.to(student[0].device, student[0].dtype) for W in new])
