"""CIFAR-10 from the python-version batches, verified, held in memory as flat float32 tensors (thesis table 3.1).

>>> from tplightning.data.cifar10 import MD5
>>> len(MD5), "test_batch" in MD5
(6, True)
"""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy
import torch
from torch import Tensor

from ..errors import ConfigError, MissingDataError
from .base import TensorData, TensorDataModule, check_split, seeded_split
from . import mnist
from .mnist import DATA_ENV, NO_DOWNLOAD_ENV, check_md5, default_data_dir, downloads_allowed

__all__ = ["CIFAR10DataModule", "MD5", "ARCHIVE", "URL", "FOLDER", "read_batch"]

#: torchvision's folder inside the data root, and the archive it is extracted from
FOLDER = "cifar-10-batches-py"
ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: md5 of each batch file (as the CIFAR-10 page and torchvision give them)
MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
#: per-channel mean and std of the 50k training images (pixels scaled to [0, 1])
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One batch file: ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``.

    The file's md5 is checked against :data:`MD5` before it is unpickled, so only the published files are ever
    unpickled (a pickle can run code). An unreadable, truncated or corrupt file gets a ``ValueError`` that says how
    to fix it.

    Args:
        path: ``data_batch_1`` .. ``data_batch_5`` or ``test_batch``.

    >>> import pickle, tempfile
    >>> path = Path(tempfile.mkdtemp()) / "test_batch"
    >>> _ = path.write_bytes(pickle.dumps({b"data": [], b"labels": []}))  # not the published file
    >>> try:
    ...     read_batch(path)
    ... except ValueError as err:
    ...     print(str(err).split(":")[0])
    md5 mismatch for ...test_batch
    """
    fix = f"delete {path} and run again with download: true (or put an intact copy there)"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"CIFAR-10 file {path} cannot be read ({err}); {fix}") from err
    check_md5(path, data, MD5.get(path.name), fix)
    try:
        batch = pickle.load(io.BytesIO(data), encoding="bytes")
        images, labels = batch[b"data"], batch[b"labels"]
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ConfigError(f"CIFAR-10 file {path} is truncated or corrupt ({type(err).__name__}: {err}); {fix}") from err
    x = torch.as_tensor(numpy.asarray(images, dtype=numpy.uint8)).flatten()
    if x.numel() != 3072 * len(labels):
        raise ConfigError(f"CIFAR-10 file {path} holds {x.numel()} pixel bytes for {len(labels)} labels, expected 3072 each")
    return x.reshape(len(labels), 3, 32, 32), torch.as_tensor(list(labels), dtype=torch.long)


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 images as 3072-dim float vectors (channel-major, as stored), a seeded train/validation split of the
    50k training images; the 10k test images are the test split.

    The python-version batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) are looked for in
    ``data_dir/cifar-10-batches-py`` (torchvision's layout: a torchvision data root works as is) and in ``data_dir``
    itself. Each file's md5 is checked before it is read. Missing files are obtained by :meth:`prepare_data` when
    ``download`` is set: the archive ``cifar-10-python.tar.gz`` (about 170 MB) is downloaded with a progress bar into
    ``data_dir``, its md5 checked, and the batches extracted into ``data_dir/cifar-10-batches-py``.

    Each image becomes ``x_c = (p_c / 255 - mean_c) / std_c`` per channel ``c`` with ``normalize`` (the training
    set's :data:`MEAN` and :data:`STD`; ``p / 255`` without), flattened channel by channel to 3072 values; labels
    are class indices 0-9. No augmentation.

    Args:
        data_dir: folder holding the files; ``None``: the data cache (``$TPLIGHTNING_DATA``, else
            ``~/.cache/tplightning``), shared with MNIST.
        num_train: training images, drawn from the 50k training images.
        num_val: validation images, disjoint from the training ones.
        split_seed: seed of the train/validation split.
        subset: use only the first ``subset`` training images before splitting (quick runs); None: all 50k.
        normalize: standardise each channel (pixels scaled to [0, 1]) with the training set's mean and std.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        shuffle_seed: seed of the per-epoch shuffling.
        download: download the archive when files are missing (``TPLIGHTNING_NO_DOWNLOAD=1`` forbids it).

    >>> import tempfile
    >>> data = CIFAR10DataModule(data_dir=tempfile.mkdtemp(), num_train=100, num_val=10, download=False)
    >>> data.input_dim, data.output_dim, sorted(name for name, path in data.find_files().items() if path is None)[-1]
    (3072, 10, 'test_batch')
    >>> try:
    ...     data.prepare_data()
    ... except FileNotFoundError as err:
    ...     print(str(err).split(" from ")[0])
    CIFAR-10 files missing
    """

    task = "classification"
    input_dim, output_dim = 3072, 10

    def __init__(
        self,
        data_dir: str | None = None,
        num_train: int = 45000,
        num_val: int = 5000,
        split_seed: int = 0,
        subset: int | None = None,
        normalize: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        shuffle_seed: int = 0,
        download: bool = True,
    ):
        super().__init__(batch_size, eval_batch_size, shuffle_seed)
        check_split(num_train, num_val, subset)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir()
        self.num_train, self.num_val, self.split_seed = num_train, num_val, split_seed
        self.subset, self.normalize, self.download = subset, normalize, download

    def find_files(self) -> dict[str, Path | None]:
        """Each batch name -> its path (in ``data_dir/cifar-10-batches-py`` or ``data_dir``), None if absent."""
        return {name: next((p for p in (self.data_dir / FOLDER / name, self.data_dir / name) if p.is_file()), None) for name in MD5}

    def _missing_error(self, missing: list[str], reason: str) -> MissingDataError:
        return MissingDataError(
            f"CIFAR-10 files missing from {self.data_dir}: {', '.join(missing)}. Put the python-version batches in "
            f"{self.data_dir / FOLDER} (the archive {ARCHIVE[0]} from {URL} unpacks to that folder), or point {DATA_ENV} "
            f"(or --data.init_args.data_dir) at a folder that has them. {reason}"
        )

    def prepare_data(self) -> None:
        """Check that the batches are present; download and extract the archive when some are missing."""
        missing = [name for name, path in self.find_files().items() if path is None]
        if not missing:
            return
        if not self.download:
            raise self._missing_error(missing, "(download=False)")
        if not downloads_allowed():
            raise self._missing_error(missing, f"(downloads are switched off by {NO_DOWNLOAD_ENV}=1)")
        archive = self.data_dir / ARCHIVE[0]
        if not archive.is_file():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            try:
                mnist.download_file(URL, archive)  # the data cache's one downloader (progress bar, atomic)
            except OSError as err:  # URLError, timeouts, HTTP errors, read-only folder
                failed = self._missing_error(missing, "")
                raise MissingDataError(f"CIFAR-10 download failed: {URL}: {mnist.download_cause(err)}. {failed}".rstrip()) from err
        self.extract(archive)

    def extract(self, archive: Path) -> None:
        """Check the archive's md5 and extract the six batch files (nothing else) into ``data_dir/cifar-10-batches-py``."""
        check_md5(archive, archive.read_bytes(), ARCHIVE[1], f"delete {archive} and run again (or put an intact copy there)")
        folder = self.data_dir / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in MD5 and not (folder / name).exists():
                    (folder / name).write_bytes(tar.extractfile(member).read())

    def _to_float(self, images: Tensor) -> Tensor:
        x = images.float().div_(255.0)
        if self.normalize:
            x = x.sub_(torch.tensor(MEAN).view(1, 3, 1, 1)).div_(torch.tensor(STD).view(1, 3, 1, 1))
        return x.reshape(len(x), -1)

    def setup(self, stage: str | None = None) -> None:
        """Read and verify the batches, split the training images and convert all images to float (once)."""
        if self.train_data is not None:
            return
        files = self.find_files()
        missing = [name for name, path in files.items() if path is None]
        if missing:
            raise self._missing_error(missing, "prepare_data() downloads them when download=True.")
        parts = [read_batch(files[name]) for name in TRAIN]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        train, val = seeded_split(len(images), self.num_train, self.num_val, self.subset, self.split_seed)
        self.train_data = TensorData(self._to_float(images[train]), labels[train])
        self.val_data = TensorData(self._to_float(images[val]), labels[val])
        test_images, test_labels = read_batch(files["test_batch"])
        self.test_data = TensorData(self._to_float(test_images), test_labels)
        self.check_splits()
