"""In-memory tensor data shared by every data module: no per-item decoding, seeded shuffling.

>>> import torch
>>> from tplightning.data import TensorData
>>> len(TensorData(torch.zeros(5, 3), torch.zeros(5)))
5
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .._lightning import pl
from ..errors import ConfigError

__all__ = ["TensorData", "EpochSeededSampler", "TensorDataModule", "derive_seed", "check_split", "seeded_split", "check_values"]


def derive_seed(seed: int, purpose: str) -> int:
    """An independent seed for ``purpose`` (teacher, inputs, perturbation, ...) derived from ``seed``.

    Generators seeded with the same integer draw the same numbers: a teacher from seed 0 and a
    student perturbation (or a student initialised after ``seed_everything(0)``) from seed 0
    would be identical, making the student a multiple of its teacher. Mixing in the purpose
    keeps the streams apart while staying reproducible: ``(seed * 1000003 + crc32(purpose)) mod (2^63 - 1)``.

    Args:
        seed: the user's seed.
        purpose: what the generator draws (any string; the same string gives the same seed).

    >>> derive_seed(0, "teacher"), derive_seed(0, "inputs")
    (2968954581, 56729678)
    """
    return (int(seed) * 1_000_003 + zlib.crc32(purpose.encode())) % (2**63 - 1)


def check_split(num_train: int, num_val: int, subset: int | None) -> None:
    """The train/validation sizes of a data module that splits a training file: ``ConfigError`` unless they fit.

    Checks what can be checked before the file is read: ``num_train >= 1``, ``num_val >= 0`` and, with a
    ``subset``, ``num_train + num_val <= subset``.

    Args:
        num_train: training items.
        num_val: validation items.
        subset: the number of items of the file used (``None``: all).

    >>> check_split(8, 2, subset=10)
    >>> try:
    ...     check_split(8, 4, subset=10)
    ... except ValueError as err:
    ...     print(err)
    subset=10 is smaller than num_train + num_val = 8 + 4
    """
    if num_train < 1 or num_val < 0:
        raise ConfigError(f"need num_train >= 1 and num_val >= 0, got num_train={num_train}, num_val={num_val}")
    if subset is not None and subset < num_train + num_val:
        raise ConfigError(f"subset={subset} is smaller than num_train + num_val = {num_train} + {num_val}")


def seeded_split(total: int, num_train: int, num_val: int, subset: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint train and validation indices into the first ``subset`` (all when None) of ``total`` items, drawn by
    one permutation seeded with ``seed``.

    The first ``num_train`` entries of ``randperm(subset or total)`` are the training indices, the next
    ``num_val`` the validation ones; ``ValueError`` when ``subset > total`` or the two do not fit.

    Args:
        total: items in the file.
        num_train: training items.
        num_val: validation items.
        subset: use only the first ``subset`` items (``None``: all ``total``).
        seed: seed of the permutation.

    >>> train, val = seeded_split(10, 4, 2, None, seed=0)
    >>> train.tolist(), val.tolist()
    ([4, 1, 7, 5], [3, 9])
    """
    if subset is not None and subset > total:
        raise ConfigError(f"subset={subset} exceeds the {total} training images in the file")
    available = total if subset is None else subset
    if num_train + num_val > available:
        raise ConfigError(
            f"num_train + num_val = {num_train} + {num_val} exceeds the {available} training images "
            f"available (subset={subset}, {total} in the file)"
        )
    perm = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return perm[:num_train], perm[num_train : num_train + num_val]


def check_values(split: str, x: Tensor, y: Tensor, task: str = "regression", num_classes: int | None = None) -> None:
    """:class:`~tplightning.errors.ConfigError` naming ``split`` and the count of bad values when a split's data cannot
    be learned from or scored.

    Refused: non-finite (NaN, inf) inputs or float targets; inputs that are all equal (constant data, e.g. inputs drawn
    with a standard deviation of 0), and, for ``regression``, targets that are all equal; for ``classification`` with
    ``num_classes``, labels outside ``[0, num_classes)``. A split of fewer than two items is never called constant.
    Vectorised: one pass over each tensor (its per-feature minimum and maximum, in which NaN and inf show) and one
    read of the flags; the bad values are counted only when there are some.

    Args:
        split: the split's name for the message (``train``, ``val``, ``test``).
        x: inputs, first dimension the items.
        y: targets (regression) or integer labels (classification).
        task: ``regression`` or ``classification``.
        num_classes: the number of classes (``None``: labels not checked).

    >>> check_values("train", torch.randn(4, 2), torch.randn(4, 1))
    >>> check_values("val", torch.tensor([[1.0, float("nan")], [0.0, float("inf")]]), torch.zeros(2, 1))
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: the val split holds 2 non-finite values (NaN or inf) in its inputs
    """
    n = len(x)
    if n == 0:
        return
    flat_x, flat_y = x.reshape(n, -1), y.reshape(n, -1)
    (x_lo, x_hi), (y_lo, y_hi) = torch.aminmax(flat_x, dim=0), torch.aminmax(flat_y, dim=0)  # one pass: NaN and inf show
    regression = task != "classification"
    labels = not regression and num_classes is not None and not y.is_floating_point()
    true = x_lo.new_ones((), dtype=torch.bool)

    def finite(lo: Tensor, hi: Tensor) -> Tensor:
        return (torch.isfinite(lo) & torch.isfinite(hi)).all() if lo.is_floating_point() else true

    flags = [finite(x_lo, x_hi), finite(y_lo, y_hi), (x_lo != x_hi).any() if n > 1 else true]
    flags += [(y_lo != y_hi).any() if n > 1 and regression else true]
    flags += [(y_lo.min() >= 0) & (y_hi.max() < num_classes) if labels and y_lo.numel() else true]
    finite_x, finite_y, varied_x, varied_y, labels_ok = torch.stack([f.to("cpu") for f in flags]).tolist()
    if not finite_x:
        bad = int((~torch.isfinite(x)).sum())
        raise ConfigError(f"the {split} split holds {bad} non-finite values (NaN or inf) in its inputs")
    if not finite_y:
        bad = int((~torch.isfinite(y)).sum())
        raise ConfigError(f"the {split} split holds {bad} non-finite values (NaN or inf) in its targets")
    if not varied_x:
        raise ConfigError(f"the {split} split's {n} inputs are all equal (constant data: nothing to learn from or score)")
    if not varied_y:
        raise ConfigError(f"the {split} split's {n} targets are all equal (constant data: nothing to learn from or score)")
    if not labels_ok:
        bad = int(((y < 0) | (y >= num_classes)).sum())
        raise ConfigError(f"the {split} split holds {bad} labels outside [0, {num_classes})")


class TensorData(Dataset):
    """``(x, y)`` tensors indexed together; a whole batch is gathered by one indexing op.

    ``__getitems__`` (which ``DataLoader`` calls with a batch's indices) returns ``(x[idx], y[idx])``
    directly, so no per-item collation happens.

    Args:
        x: inputs, first dimension the items.
        y: labels or targets, as many items as ``x`` (``ValueError`` otherwise).

    >>> data = TensorData(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 2]))
    >>> len(data), data[1]
    (3, (tensor([2., 3.]), tensor(1)))
    >>> x, y = data.__getitems__([2, 0])
    >>> x.tolist(), y.tolist()
    ([[4.0, 5.0], [0.0, 1.0]], [2, 0])
    """

    def __init__(self, x: Tensor, y: Tensor):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x[idx], self.y[idx]


def _as_batch(batch):
    return batch


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` before each epoch, so the order depends only on the seed and the
    epoch number: a run resumed from a checkpoint sees the same batches as an uninterrupted one.

    Args:
        n: number of items.
        seed: the permutation of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``seed + e``.

    >>> sampler = EpochSeededSampler(5, seed=0)
    >>> list(sampler)
    [4, 0, 1, 3, 2]
    >>> sampler.set_epoch(1)
    >>> list(sampler)
    [0, 4, 2, 3, 1]
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of epoch ``epoch`` from now on."""
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class TensorDataModule(pl.LightningDataModule):
    """Base for data modules whose splits are tensors in memory.

    Subclasses fill ``self.train_data``, ``self.val_data``, ``self.test_data`` (``TensorData``) in
    ``setup`` and set ``input_dim``, ``output_dim`` and ``task`` (``regression`` or
    ``classification``), which the rules check against their layer sizes. The training loader
    shuffles with an :class:`EpochSeededSampler`; validation and test loaders keep the order. The last
    batch may be smaller (``drop_last=False``). The predict split is the test split by default
    (``self.predict_data``, set it in ``setup`` to predict other inputs): ``trainer.predict`` and
    ``python -m tplightning predict`` return the model's outputs for the test set, in its order.

    Args:
        batch_size: training batch size (``>= 1``).
        eval_batch_size: validation/test batch size (``>= 1``).
        shuffle_seed: seed of the per-epoch shuffling.
        shuffle: shuffle the training set every epoch (off: fixed order).

    >>> class Line(TensorDataModule):
    ...     input_dim, output_dim = 1, 1
    ...     def setup(self, stage=None):
    ...         x = torch.arange(5.0).unsqueeze(1)
    ...         self.train_data = self.val_data = self.test_data = TensorData(x, 2 * x)
    >>> data = Line(batch_size=2, shuffle=False)
    >>> data.setup()
    >>> [tuple(x.shape) for x, y in data.train_dataloader()]
    [(2, 1), (2, 1), (1, 1)]
    >>> len(data.predict_dataloader().dataset)  # the test split
    5
    """

    task: str = "regression"

    def __init__(self, batch_size: int = 32, eval_batch_size: int = 1000, shuffle_seed: int = 0, shuffle: bool = True):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"batch sizes must be >= 1, got batch_size={batch_size}, eval_batch_size={eval_batch_size}")
        self.batch_size, self.eval_batch_size, self.shuffle_seed, self.shuffle = batch_size, eval_batch_size, shuffle_seed, shuffle
        self.train_data = self.val_data = self.test_data = None
        self.predict_data: TensorData | None = None  # None: the test split

    def check_splits(self) -> None:
        """:func:`check_values` on each split that :meth:`setup` filled (subclasses call it at the end of ``setup``)."""
        for split in ("train", "val", "test"):
            data = getattr(self, f"{split}_data")
            if data is not None and len(data):
                check_values(split, data.x, data.y, self.task, getattr(self, "output_dim", None))

    def _loader(self, data: TensorData, train: bool) -> DataLoader:
        if data is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        batch_size = self.batch_size if train else self.eval_batch_size
        if train and self.shuffle:
            order = {"sampler": EpochSeededSampler(len(data), self.shuffle_seed)}
        else:
            order = {"shuffle": False}
        return DataLoader(data, batch_size=batch_size, drop_last=False, collate_fn=_as_batch, **order)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_data, False)

    def predict_dataloader(self) -> DataLoader:
        """The inputs of :attr:`predict_data`, or of the test split when it is ``None``, in order, as ``(x, y)`` batches
        (the rules' ``predict_step`` ignores ``y``)."""
        return self._loader(self.predict_data if self.predict_data is not None else self.test_data, False)
