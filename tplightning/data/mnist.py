"""MNIST from the four original IDX files, verified, held in memory as flat float32 tensors.

>>> from tplightning.data.mnist import MD5
>>> sorted(MD5)
['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte']
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import socket
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, MissingDataError
from .base import TensorData, TensorDataModule, check_split, seeded_split

__all__ = ["MNISTDataModule", "MD5", "MIRRORS", "DATA_ENV", "NO_DOWNLOAD_ENV", "default_data_dir", "download_file",
           "download_cause", "downloads_allowed", "check_md5", "find_files", "read_idx"]  # fmt: skip

#: md5 of the *decompressed* IDX files (the gzip wrappers differ between sources).
MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/")
MEAN, STD = 0.1307, 0.3081
#: environment variable naming the data cache (a torchvision data root works: ``<root>/MNIST/raw``)
DATA_ENV = "TPLIGHTNING_DATA"
#: set to 1 to forbid downloads whatever the config says (tests, CI, offline machines)
NO_DOWNLOAD_ENV = "TPLIGHTNING_NO_DOWNLOAD"


def default_data_dir() -> Path:
    """``$TPLIGHTNING_DATA`` if set, else ``$XDG_CACHE_HOME/tplightning`` (``~/.cache/tplightning``), as an absolute path.

    >>> import os
    >>> os.environ["TPLIGHTNING_DATA"], saved = "/tmp/mnist-cache", os.environ.get("TPLIGHTNING_DATA")
    >>> str(default_data_dir())
    '/tmp/mnist-cache'
    >>> if saved is None: del os.environ["TPLIGHTNING_DATA"]
    ... else: os.environ["TPLIGHTNING_DATA"] = saved
    """
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "tplightning").expanduser().resolve()
_IDX_UBYTE = 0x08


def download_file(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Download ``url`` to ``dest`` with a progress bar; ``dest`` only appears once complete.

    The bytes go to ``dest.part`` first, which is renamed to ``dest`` when the download ends and removed if
    it fails; network errors propagate (``urllib.error.URLError``, timeouts: ``OSError``).

    Args:
        url: any URL ``urllib`` opens (``https://``, ``file://``).
        dest: the file to write.
        timeout: seconds to wait for the server.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "source").write_bytes(b"IDX")
    >>> download_file((folder / "source").as_uri(), folder / "copy")
    >>> (folder / "copy").read_bytes(), (folder / "copy.part").exists()
    (b'IDX', False)
    """
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def downloads_allowed() -> bool:
    """False when ``TPLIGHTNING_NO_DOWNLOAD`` forbids downloads (set to anything but empty or ``0``).

    >>> import os
    >>> saved = os.environ.pop("TPLIGHTNING_NO_DOWNLOAD", None)
    >>> os.environ["TPLIGHTNING_NO_DOWNLOAD"] = "1"
    >>> downloads_allowed()
    False
    >>> _ = os.environ.pop("TPLIGHTNING_NO_DOWNLOAD")
    >>> if saved is not None: os.environ["TPLIGHTNING_NO_DOWNLOAD"] = saved
    """
    return os.environ.get(NO_DOWNLOAD_ENV, "") in ("", "0")


def check_md5(path: Path, data: bytes, expected: str | None, fix: str, what: str = "") -> None:
    """``ConfigError`` naming ``path`` and ``fix`` unless the md5 of ``data`` is ``expected``.

    Args:
        path: the file ``data`` was read from (for the message).
        data: the bytes to check.
        expected: the md5 hex digest (``None`` never matches: an unknown file is refused).
        fix: what the user should do, appended to the message.
        what: inserted after the path, e.g. ``" (decompressed bytes)"``.

    >>> check_md5(Path("f"), b"", "d41d8cd98f00b204e9800998ecf8427e", "fix it")
    >>> try:
    ...     check_md5(Path("f"), b"x", "d41d8cd98f00b204e9800998ecf8427e", "fix it")
    ... except ValueError as err:
    ...     print(err)
    md5 mismatch for f: expected d41d8cd98f00b204e9800998ecf8427e, got 9dd4e461268c8034f5c8564e155c67a6; fix it
    """
    actual = hashlib.md5(data).hexdigest()
    if actual != expected:
        raise ConfigError(f"md5 mismatch for {path}{what}: expected {expected}, got {actual}; {fix}")


def _raw_dir(data_dir: Path) -> Path:
    return data_dir / "MNIST" / "raw"


def find_files(data_dir: Path) -> dict[str, Path | None]:
    """Each MNIST file name -> its path (``<name>.gz`` or raw, in ``data_dir`` or ``data_dir/MNIST/raw``), None if absent.

    ``data_dir`` is searched before ``data_dir/MNIST/raw``, and in each folder ``<name>.gz`` before ``<name>``.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    >>> {name: path.name for name, path in find_files(folder).items() if path is not None}
    {'t10k-labels-idx1-ubyte': 't10k-labels-idx1-ubyte.gz'}
    """
    found = {}
    for name in MD5:
        candidates = (folder / (name + ext) for folder in (data_dir, _raw_dir(data_dir)) for ext in (".gz", ""))
        found[name] = next((p for p in candidates if p.is_file()), None)
    return found


def download_cause(err: OSError) -> str:
    """Why a download failed, in words a user acts on: no network, a refused or timed-out connection, an HTTP status.

    >>> import socket, urllib.error
    >>> download_cause(urllib.error.URLError(socket.gaierror(-2, "Name or service not known")))
    'no network (the host name cannot be resolved: Name or service not known)'
    >>> download_cause(urllib.error.HTTPError("https://x/y", 404, "Not Found", None, None))
    'the server answered HTTP 404 Not Found'
    """
    reason = err.reason if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError) else err
    if isinstance(err, urllib.error.HTTPError):
        return f"the server answered HTTP {err.code} {err.reason}"
    if isinstance(reason, socket.gaierror):
        return f"no network (the host name cannot be resolved: {reason.strerror or reason})"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"the connection timed out ({reason})"
    if isinstance(reason, ConnectionError):
        return f"no connection to the server ({reason})"
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)


def _missing_error(data_dir: Path, missing: list[str], reason: str) -> MissingDataError:
    return MissingDataError(
        f"MNIST files missing from {data_dir}: {', '.join(missing)}. Put each at "
        f"{_raw_dir(data_dir)}/<name>.gz (or the uncompressed <name>, or directly in {data_dir}), or point "
        f"{DATA_ENV} (or --data.init_args.data_dir) at a folder that has them. {reason}"
    )


def read_idx(path: Path, ndim: int) -> Tensor:
    """Read an unsigned-byte IDX file (gzip or raw) with ``ndim`` dimensions, verifying its md5 against ``MD5``.

    The md5 of the decompressed bytes must be the one :data:`MD5` lists for the file's name (without ``.gz``), so
    only the four MNIST files are read. Then the header is checked: two zero bytes, type ``0x08`` (unsigned
    byte), ``ndim`` dimensions, each a big-endian 32-bit count, and a data size equal to their product.
    A truncated, corrupt or malformed file gets a ``ValueError`` that says how to fix it.

    Args:
        path: the file, ``<name>`` or ``<name>.gz``.
        ndim: 3 for images ``(N, 28, 28)``, 1 for labels ``(N,)``.

    Returns:
        A ``uint8`` tensor of the file's dimensions.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t10k-labels-idx1-ubyte"
    >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 3]))  # a well-formed IDX file, but not MNIST's
    >>> try:
    ...     read_idx(path, 1)
    ... except ValueError as err:
    ...     print(str(err).split(":")[0])
    md5 mismatch for ...t10k-labels-idx1-ubyte (decompressed bytes)
    """
    name = path.name.removesuffix(".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    fix = f"delete {path} and run again with download: true (or put an intact copy there)"
    try:
        with opener(path, "rb") as f:
            data = bytearray(f.read())
    except (EOFError, OSError, zlib.error) as err:  # truncated gzip, not gzip at all, unreadable
        raise ConfigError(f"MNIST file {path} is truncated or corrupt ({err}); {fix}") from err
    check_md5(path, data, MD5.get(name), fix, " (decompressed bytes)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"malformed IDX file {path}: {len(data)} bytes is shorter than its {header}-byte header")
    zero, dtype, dims_in_file = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_UBYTE or dims_in_file != ndim:
        raise ConfigError(
            f"malformed IDX file {path}: magic number {bytes(data[:4]).hex()} is not an unsigned-byte {ndim}-d IDX file"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + math.prod(dims):
        raise ConfigError(f"malformed IDX file {path}: header says dims {dims} but the file holds {len(data) - header} data bytes")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header).reshape(dims)


class MNISTDataModule(TensorDataModule):
    """MNIST digits as 784-dim float vectors, a seeded train/validation split of the 60k training images.

    The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), gzip-compressed (``.gz``) or raw, are
    looked for in ``data_dir`` and in ``data_dir/MNIST/raw`` (torchvision's layout). Their
    decompressed bytes are checked against known md5 sums. Missing files are downloaded into
    ``data_dir/MNIST/raw`` by :meth:`prepare_data` when ``download`` is set; offline, a
    ``FileNotFoundError`` lists them. The test split is the 10k ``t10k`` images.

    Each image becomes ``x = (p / 255 - 0.1307) / 0.3081`` with ``normalize`` (``p / 255`` without), flattened
    row by row to 784 values; labels are class indices 0-9. The validation images are held out of the 60k
    training images (``num_val``, drawn by ``split_seed``); the test images are never used for model selection.

    Args:
        data_dir: folder holding the MNIST files (relative paths resolve against the working directory);
            ``None``: the data cache, ``$TPLIGHTNING_DATA`` or else ``~/.cache/tplightning``
            (:func:`default_data_dir`). A torchvision data root (``<root>/MNIST/raw``) works as is.
        num_train: training images, drawn from the training files.
        num_val: validation images, drawn from the training files, disjoint from the training ones.
        split_seed: seed of the train/validation split.
        subset: use only the first ``subset`` training images before splitting (quick runs); None: all 60k.
        normalize: standardise pixels (scaled to [0, 1]) with MNIST's mean 0.1307 and std 0.3081.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        shuffle_seed: seed of the per-epoch shuffling.
        download: download missing files from the usual mirrors (never overwrites present files);
            ``TPLIGHTNING_NO_DOWNLOAD=1`` in the environment forbids it whatever the config says.

    >>> import tempfile
    >>> data = MNISTDataModule(data_dir=tempfile.mkdtemp(), num_train=100, num_val=10, download=False)
    >>> data.input_dim, data.output_dim, data.task
    (784, 10, 'classification')
    >>> try:
    ...     data.prepare_data()
    ... except FileNotFoundError as err:
    ...     print(str(err).split(" from ")[0])
    MNIST files missing
    """

    task = "classification"
    input_dim, output_dim = 784, 10

    def __init__(
        self,
        data_dir: str | None = None,
        num_train: int = 55000,
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

    def prepare_data(self) -> None:
        """Check that the files are present; download the missing ones when ``download`` is set."""
        missing = [name for name, path in find_files(self.data_dir).items() if path is None]
        if not missing:
            return
        if not self.download:
            raise _missing_error(self.data_dir, missing, "(download=False)")
        if not downloads_allowed():
            raise _missing_error(self.data_dir, missing, f"(downloads are switched off by {NO_DOWNLOAD_ENV}=1)")
        for name in list(missing):
            dest = _raw_dir(self.data_dir) / f"{name}.gz"
            errors = []
            for mirror in MIRRORS:
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    download_file(f"{mirror}{name}.gz", dest)
                    break
                except OSError as e:  # URLError, timeouts, HTTP errors, read-only folder
                    errors.append(f"{mirror}{name}.gz: {download_cause(e)}")
            else:
                failed = _missing_error(self.data_dir, missing, "")
                raise MissingDataError(f"MNIST download failed: {'; '.join(errors)}. {failed}".rstrip())
            try:
                read_idx(dest, 3 if "images" in name else 1)
            except ValueError:
                dest.unlink(missing_ok=True)
                raise
            missing.remove(name)

    def _load(self, files: dict[str, Path], split: str) -> tuple[Tensor, Tensor]:
        images = read_idx(files[f"{split}-images-idx3-ubyte"], 3)
        labels = read_idx(files[f"{split}-labels-idx1-ubyte"], 1).long()
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ConfigError(f"MNIST {split} files disagree: images {tuple(images.shape)}, labels {tuple(labels.shape)}")
        return images, labels

    def _to_float(self, images: Tensor) -> Tensor:
        x = images.reshape(len(images), -1).float().div_(255.0)
        return x.sub_(MEAN).div_(STD) if self.normalize else x

    def setup(self, stage: str | None = None) -> None:
        """Read and verify the files, split the training images and convert all images to float (once)."""
        if self.train_data is not None:
            return
        files = find_files(self.data_dir)
        missing = [name for name, path in files.items() if path is None]
        if missing:
            raise _missing_error(self.data_dir, missing, "prepare_data() downloads them when download=True.")
        images, labels = self._load(files, "train")
        train, val = seeded_split(len(images), self.num_train, self.num_val, self.subset, self.split_seed)
        self.train_data = TensorData(self._to_float(images[train]), labels[train])
        self.val_data = TensorData(self._to_float(images[val]), labels[val])
        test_images, test_labels = self._load(files, "t10k")
        self.test_data = TensorData(self._to_float(test_images), test_labels)
        self.check_splits()
