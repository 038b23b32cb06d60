"""CIFAR10DataModule on small fake batch files written here (the real CIFAR-10 is not on these machines)."""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from tplightning.config_files import CONFIG_DIR
from tplightning.cli import main as train_main
from tplightning.data import cifar10, mnist
from tplightning.data.cifar10 import CIFAR10DataModule

N_TRAIN, N_TEST = 12, 8  # images per fake training batch (5 of them) and in the fake test batch


def fake_batches(seed: int = 0) -> dict[str, bytes]:
    """Pickled python-version batches as CIFAR-10's (a bytes-keyed dict, uint8 data (N, 3072), a list of labels)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in cifar10.MD5:
        n = N_TEST if name == "test_batch" else N_TRAIN
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}  # fmt: skip
        out[name] = pickle.dumps(batch)
    return out


@pytest.fixture
def fake_md5(monkeypatch):
    """The fake files' md5 sums in place of the published ones; returns the files' bytes."""
    files = fake_batches()
    for name, data in files.items():
        monkeypatch.setitem(cifar10.MD5, name, hashlib.md5(data).hexdigest())
    return files


@pytest.fixture
def root(tmp_path, fake_md5):
    """A torchvision-style data root with the fake batches in cifar-10-batches-py/."""
    folder = tmp_path / "data" / cifar10.FOLDER
    folder.mkdir(parents=True)
    for name, data in fake_md5.items():
        (folder / name).write_bytes(data)
    return tmp_path / "data"


def test_loads_splits_and_normalises(root, fake_md5):
    dm = CIFAR10DataModule(str(root), num_train=40, num_val=10, subset=55, download=False)
    dm.prepare_data()
    dm.setup()
    assert dm.train_data.x.shape == (40, 3072) and dm.val_data.x.shape == (10, 3072) and dm.test_data.x.shape == (8, 3072)
    raw = [pickle.loads(fake_md5[n]) for n in cifar10.TRAIN]
    pixels = np.concatenate([b[b"data"] for b in raw]).astype(np.float64)  # (60, 3072), channel-major R, G, B planes
    labels = np.concatenate([b[b"labels"] for b in raw])
    mean, std = np.repeat(cifar10.MEAN, 1024), np.repeat(cifar10.STD, 1024)
    expected = (pixels / 255.0 - mean) / std
    # every training/validation row is one of the first 55 images (subset), each used once
    rows = torch.cat([dm.train_data.x, dm.val_data.x]).double().numpy()
    ys = torch.cat([dm.train_data.y, dm.val_data.y]).numpy()
    idx = [int(np.argmin(np.abs(expected - r).max(1))) for r in rows]
    assert len(set(idx)) == 50 and max(idx) < 55
    assert np.allclose(rows, expected[idx], atol=1e-5) and (ys == labels[idx]).all()
    test = pickle.loads(fake_md5["test_batch"])
    assert np.allclose(dm.test_data.x.double().numpy(), (test[b"data"] / 255.0 - mean) / std, atol=1e-5)
    assert dm.test_data.y.tolist() == test[b"labels"]


def test_the_split_is_seeded_and_raw_pixels_without_normalize(root):
    a, b, c = (CIFAR10DataModule(str(root), num_train=30, num_val=10, split_seed=s, normalize=False) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.val_data.x, b.val_data.x) and not torch.equal(a.val_data.x, c.val_data.x)
    assert a.train_data.x.min() >= 0 and a.train_data.x.max() <= 1 and a.train_data.x.max() > 0.9


def test_corrupt_and_truncated_files_are_named(root, monkeypatch):
    path = root / cifar10.FOLDER / "data_batch_3"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"md5 mismatch for .*data_batch_3: expected .*delete .*data_batch_3"):
        CIFAR10DataModule(str(root), num_train=30, num_val=10).setup()
    # a file whose md5 is right but whose pickle is cut short (a wrong sum in MD5, say) is still a clear error
    monkeypatch.setitem(cifar10.MD5, "data_batch_3", hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match=r"CIFAR-10 file .*data_batch_3 is truncated or corrupt"):
        CIFAR10DataModule(str(root), num_train=30, num_val=10).setup()


def test_missing_files_without_download(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 files missing from .*data_batch_1, .*test_batch.*download=False"):
        CIFAR10DataModule(str(tmp_path), download=False).prepare_data()
    monkeypatch.setenv(mnist.NO_DOWNLOAD_ENV, "1")
    with pytest.raises(FileNotFoundError, match="switched off by TPLIGHTNING_NO_DOWNLOAD=1"):
        CIFAR10DataModule(str(tmp_path)).prepare_data()
    with pytest.raises(ValueError, match="subset=10 is smaller than num_train \\+ num_val"):
        CIFAR10DataModule(str(tmp_path), num_train=8, num_val=5, subset=10)


def test_download_checks_and_extracts_the_archive(tmp_path, fake_md5, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [*fake_md5.items(), ("readme.html", b"not extracted")]:
            info = tarfile.TarInfo(f"{cifar10.FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    urls = []

    def fake_download(url, dest, *args, **kwargs):
        urls.append(url)
        dest.write_bytes(archive)

    monkeypatch.setattr(mnist, "download_file", fake_download)
    dm = CIFAR10DataModule(str(tmp_path), num_train=40, num_val=10)
    with pytest.raises(ValueError, match=r"md5 mismatch for .*cifar-10-python.tar.gz"):  # the published sum
        dm.prepare_data()
    monkeypatch.setattr(cifar10, "ARCHIVE", (cifar10.ARCHIVE[0], hashlib.md5(archive).hexdigest()))
    dm.prepare_data()  # the archive is there now: checked and extracted, not downloaded again
    assert urls == [cifar10.URL]
    assert sorted(p.name for p in (tmp_path / cifar10.FOLDER).iterdir()) == sorted(cifar10.MD5)
    dm.setup()
    assert dm.train_data.x.shape == (40, 3072)


# the fully connected configs (the convolutional ones of torch modules: tests/test_lenet_configs.py)
FC_CONFIGS = [p for p in sorted((CONFIG_DIR / "cifar10").glob("*.yaml")) if "sizes" in p.read_text()]


@pytest.mark.parametrize("config", FC_CONFIGS, ids=lambda p: p.stem)
def test_cifar10_configs_train_on_fake_data(config, root, one_thread):
    small = ["--data.init_args.num_train", "40", "--data.init_args.num_val", "10", "--data.init_args.data_dir", str(root)]
    out = train_main(["--config", str(config), "--trainer.fast_dev_run", "true", *small])
    assert out["cli"].model.net.sizes == [3072, 1024, 1024, 1024, 10]
    assert 0.0 <= out["test_metrics"]["test/acc"] <= 1.0
