"""MNISTDataModule on tiny fake IDX files (md5 table patched) and once on the real shared MNIST."""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA

from tplightning.data import mnist
from tplightning.data.mnist import MNISTDataModule

NAMES = list(mnist.MD5)
REAL_DATA = SHARED_DATA


def idx_bytes(array: np.ndarray, magic_dtype: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, magic_dtype, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_mnist(folder: Path, monkeypatch, gz: bool = True, n_train: int = 20, n_test: int = 10, names=NAMES):
    """Write fake IDX files (image i has every pixel equal to i, label i % 10) and patch ``MD5`` to match."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images-idx3-ubyte"] = np.broadcast_to(np.arange(n)[:, None, None], (n, 28, 28))
        arrays[f"{split}-labels-idx1-ubyte"] = np.arange(n) % 10
    for name in names:
        data = idx_bytes(arrays[name])
        monkeypatch.setitem(mnist.MD5, name, hashlib.md5(data).hexdigest())
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def make_dm(data_dir: Path, **kwargs) -> MNISTDataModule:
    kwargs = {"num_train": 15, "num_val": 5, "batch_size": 4, "eval_batch_size": 3, **kwargs}
    return MNISTDataModule(data_dir=str(data_dir), **kwargs)


def offline(monkeypatch):
    def fail(url, dest):
        raise OSError(f"offline: {url}")

    monkeypatch.setattr(mnist, "download_file", fail)


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("gz", [True, False])
def test_loads_both_layouts_and_compressions(tmp_path, monkeypatch, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    write_fake_mnist(folder, monkeypatch, gz=gz)
    offline(monkeypatch)
    dm = make_dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    for data, n in ((dm.train_data, 15), (dm.val_data, 5), (dm.test_data, 10)):
        assert data.x.shape == (n, 784) and data.x.dtype == torch.float32
        assert data.y.shape == (n,) and data.y.dtype == torch.int64
    assert (dm.input_dim, dm.output_dim, dm.task) == (784, 10, "classification")


def test_split_is_disjoint_and_normalised(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    dm = make_dm(tmp_path)
    dm.setup()
    # fake image i is constant i, so each row's pixel value identifies the image
    def ids(data):
        return (data.x[:, 0] * mnist.STD + mnist.MEAN).mul(255).round().long()

    train, val = ids(dm.train_data), ids(dm.val_data)
    assert len(set(train.tolist()) | set(val.tolist())) == 20
    assert torch.equal(dm.train_data.y, train % 10)
    assert torch.allclose(dm.test_data.x[0], torch.full((784,), -0.1307 / 0.3081))
    raw = make_dm(tmp_path, normalize=False)
    raw.setup()
    assert raw.test_data.x.min() == 0 and raw.test_data.x.max() == pytest.approx(9 / 255)


def test_split_seed(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    splits = []
    for seed in (0, 0, 1):
        dm = make_dm(tmp_path, split_seed=seed)
        dm.setup()
        splits.append(dm.train_data.x[:, 0])
    assert torch.equal(splits[0], splits[1])
    assert not torch.equal(splits[0], splits[2])


def test_subset_and_size_errors(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    dm = make_dm(tmp_path, num_train=8, num_val=2, subset=10)
    dm.setup()
    assert dm.train_data.x.mul(mnist.STD).add(mnist.MEAN).max() < 10 / 255  # only images 0..9
    with pytest.raises(ValueError, match="exceeds the 20 training images"):
        make_dm(tmp_path, num_train=18, num_val=5).setup()
    with pytest.raises(ValueError, match="subset=10"):
        make_dm(tmp_path, num_train=15, num_val=5, subset=10)
    with pytest.raises(ValueError, match=r"subset=30 exceeds the 20 training images in the file"):
        make_dm(tmp_path, num_train=8, num_val=2, subset=30).setup()


def test_dataloaders(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    dm = make_dm(tmp_path)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 784) and y.shape == (4,) and y.dtype == torch.int64
    assert [len(b[0]) for b in dm.val_dataloader()] == [3, 2]
    assert [len(b[0]) for b in dm.test_dataloader()] == [3, 3, 3, 1]


def test_setup_is_idempotent(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    dm = make_dm(tmp_path)
    dm.setup()
    train = dm.train_data
    dm.setup("test")
    assert dm.train_data is train


def test_md5_mismatch(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch)
    monkeypatch.setitem(mnist.MD5, "t10k-labels-idx1-ubyte", "0" * 32)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*expected 0{32}, got [0-9a-f]{32}"):
        make_dm(tmp_path).setup()


@pytest.mark.parametrize(
    "data, message",
    [
        (idx_bytes(np.zeros((3, 28, 28)), magic_dtype=0x09), "magic number 00000903"),
        (idx_bytes(np.zeros(3 * 784)), "magic number 00000801 is not an unsigned-byte 3-d"),
        (idx_bytes(np.zeros((3, 28, 28)))[:-1], "holds 2351 data bytes"),
        (b"\x00\x00", "shorter than"),
    ],
)
def test_malformed_header(tmp_path, monkeypatch, data, message):
    write_fake_mnist(tmp_path, monkeypatch, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data)
    monkeypatch.setitem(mnist.MD5, "train-images-idx3-ubyte", hashlib.md5(data).hexdigest())
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*" + message):
        make_dm(tmp_path).setup()


def test_missing_files_offline_lists_all(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path, monkeypatch, names=["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
    offline(monkeypatch)
    dm = make_dm(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte, t10k-images-idx3-ubyte\..*MNIST/raw/<name>\.gz.*offline"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte, t10k-images-idx3-ubyte\..*prepare_data"):
        dm.setup()


def test_download_false_never_downloads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mnist, "download_file", lambda url, dest: calls.append(url))
    with pytest.raises(FileNotFoundError, match=", ".join(NAMES) + r".*download=False"):
        make_dm(tmp_path, download=False).prepare_data()
    assert calls == []


def test_download_fills_missing_files_only(tmp_path, monkeypatch):
    source = tmp_path / "mirror"
    write_fake_mnist(source, monkeypatch)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / f"{NAMES[0]}.gz").write_bytes((source / f"{NAMES[0]}.gz").read_bytes())
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        if url.startswith(mnist.MIRRORS[0]):
            raise OSError("first mirror down")
        dest.write_bytes((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(mnist, "download_file", fake_download)
    dm = make_dm(data_dir)
    dm.prepare_data()
    assert len(calls) == 2 * 3 and all(NAMES[0] not in url for url in calls)
    assert sorted(p.name for p in (data_dir / "MNIST" / "raw").iterdir()) == sorted(f"{n}.gz" for n in NAMES[1:])
    dm.prepare_data()  # everything present now: no further download
    assert len(calls) == 6
    dm.setup()
    assert len(dm.test_data) == 10


def test_corrupt_download_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "download_file", lambda url, dest: dest.write_bytes(gzip.compress(b"garbage")))
    with pytest.raises(ValueError, match="md5 mismatch"):
        make_dm(tmp_path).prepare_data()
    assert not any((tmp_path / "MNIST" / "raw").iterdir())


def test_real_mnist_subset():
    if not REAL_DATA.is_dir():
        pytest.skip(f"shared MNIST not found at {REAL_DATA}")
    dm = MNISTDataModule(data_dir=str(REAL_DATA), num_train=1500, num_val=500, subset=2000, download=False)
    dm.prepare_data()
    dm.setup()
    assert dm.train_data.x.shape == (1500, 784) and dm.val_data.x.shape == (500, 784)
    assert dm.test_data.x.shape == (10000, 784) and dm.test_data.y.dtype == torch.int64
    for data in (dm.train_data, dm.val_data, dm.test_data):
        assert data.y.min() == 0 and data.y.max() == 9
    assert dm.train_data.x.min() == pytest.approx(-0.1307 / 0.3081)
    assert abs(dm.test_data.x.mean().item()) < 0.05 and abs(dm.test_data.x.std().item() - 1) < 0.05
