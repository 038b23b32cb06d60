"""Shared fixtures: tiny data, a quiet trainer, and the registry of every rule with test settings."""
from __future__ import annotations

import functools
import os
import signal
import warnings
from pathlib import Path

import pytest
from tplightning._lightning import pl  # issue 12: the package TPLIGHTNING_LIGHTNING chose
import torch

import tplightning as tp

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*The number of training batches.*")
os.environ.setdefault("PL_DISABLE_FORK", "1")
# issue 12: the configs' data cache is the shared MNIST folder next to the repository (CI sets the same)
REPO = Path(__file__).resolve().parents[1]  # the repository root
SHARED_DATA = REPO.parent / "shared" / "data"  # the shared MNIST beside it (tests are skipped where it is absent)
FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ.setdefault("TPLIGHTNING_DATA", str(SHARED_DATA))

SGD = functools.partial(torch.optim.SGD, lr=0.01)

# every rule with the constructor arguments the shared tests use (sizes come from the test)
RULES: dict[str, tuple[type, dict]] = {
    "BP": (tp.BP, {}),
    "BPFixed": (tp.BPFixed, {}),
    "FA": (tp.FA, {}),
    "DFA": (tp.DFA, {}),
    "BDFA": (tp.BDFA, {"feedback_optimizer": functools.partial(torch.optim.SGD, lr=0.001)}),
    "USF": (tp.USF, {}),
    "BRSF": (tp.BRSF, {}),
    "FRSF": (tp.FRSF, {}),
    "KP": (tp.KP, {}),
    "WM": (tp.WM, {}),
    "TPEI": (tp.TPEI, {}),
    "DTPEI": (tp.DTPEI, {}),
    "RTPEI": (tp.RTPEI, {}),
    "RMTPEI": (tp.RMTPEI, {"forward_optimizer": functools.partial(torch.optim.SGD, lr=0.0005)}),
    "TPAI": (tp.TPAI, {}),
    "RTPAI": (tp.RTPAI, {}),
    "DTPAI": (tp.DTPAI, {}),
    "RDTPAI": (tp.RDTPAI, {}),
    "OriginalTP": (tp.OriginalTP, {}),
    "OriginalRTP": (tp.OriginalRTP, {}),
    "OriginalDTP": (tp.OriginalDTP, {}),
    "OriginalRDTP": (tp.OriginalRDTP, {}),
    "LeeDTP": (tp.LeeDTP, {}),
    "AOSDTP": (tp.AOSDTP, {"aux_units": 2}),
    "MTP": (tp.MTP, {}),
    "DRL": (tp.DRL, {}),
    "DDTPLinear": (tp.DDTPLinear, {}),
    "LDRL": (tp.LDRL, {"feedback_iterations": 1}),
    "GaussNewton": (tp.GaussNewton, {}),
    "FWDTP": (tp.FWDTP, {}),
    "CCL": (tp.CCL, {"feedback_optimizer": SGD}),
}
TP_RULES = [n for n in RULES if n not in ("BP", "BPFixed", "GaussNewton")]


def make_rule(name: str, sizes=(6, 6, 6), **kw):
    cls, defaults = RULES[name]
    args = {"sizes": list(sizes), "forward_optimizer": SGD, **defaults, **kw}
    if issubclass(cls, (tp.LearnedInverseRule, tp.BDFA)):
        args.setdefault("feedback_optimizer", SGD)
    return cls(**args)


def tiny_data(sizes=(6, 6, 6), **kw) -> tp.StudentTeacherDataModule:
    args = {"sizes": list(sizes), "num_train": 64, "num_val": 32, "num_test": 32, "batch_size": 8, **kw}
    return tp.StudentTeacherDataModule(**args)


def quiet_trainer(**kw) -> pl.Trainer:
    args = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kw,
    }
    return pl.Trainer(**args)


def weights_of(rule) -> list[torch.Tensor]:
    """Copies of every parameter and buffer of a rule, in a fixed order."""
    return [t.detach().clone() for t in list(rule.parameters()) + list(rule.buffers())]


class SaveReplica(pl.Callback):
    """Each DDP rank writes its parameters and buffers at the end of training, so a test can compare the replicas."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(weights_of(pl_module), self.folder / f"rank{trainer.global_rank}.pt")


def fit_ddp_replicas(rule, datamodule, folder: Path, callbacks=(), ckpt_path=None, **trainer_kw) -> list[list[torch.Tensor]]:
    """Fit ``rule`` on 2 CPU processes (gloo, ``ddp_spawn``), with ``callbacks`` and resuming from ``ckpt_path`` if
    given; each rank's final weights.

    On some hosts a gloo worker aborts at interpreter exit ("terminate called without an active exception"), after
    training ended. Only that is tolerated: exit by SIGABRT with both ranks' replicas saved by ``on_train_end``."""
    from torch.multiprocessing import ProcessExitedException

    trainer = quiet_trainer(devices=2, strategy="ddp_spawn", callbacks=[SaveReplica(folder), *callbacks], **trainer_kw)
    try:
        trainer.fit(rule, datamodule=datamodule, ckpt_path=ckpt_path)
    except ProcessExitedException as e:
        if e.exit_code != -signal.SIGABRT or not all((folder / f"rank{r}.pt").exists() for r in (0, 1)):
            raise
    return [torch.load(folder / f"rank{r}.pt") for r in (0, 1)]


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder: runs/, checkpoints and config.yaml land there."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _never_download(monkeypatch):
    """Tests never download (issue 12); a test that fakes a download patches ``download_file`` itself."""
    from tplightning.data import mnist

    def refuse(url, dest, *args, **kwargs):
        raise OSError(f"tests never download (asked for {url})")

    monkeypatch.setattr(mnist, "download_file", refuse)


@pytest.fixture
def one_thread():
    """One torch thread (small matrices on a shared machine); restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class OneBatch(pl.LightningDataModule):
    """The fixed tensors ``x, y`` as one training batch (a step-by-step reference needs exactly that batch)."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def train_dataloader(self):
        from torch.utils.data import DataLoader, TensorDataset

        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x))
