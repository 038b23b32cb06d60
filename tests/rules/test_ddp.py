"""DDP (2 CPU processes, gloo, ddp_spawn): replicas end identical; BP on 2 processes = doubled batch."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from tplightning._lightning import pl  # the Lightning package the project's switch chose
from conftest import fit_ddp_replicas, make_rule, quiet_trainer, tiny_data, weights_of
from tplightning import StudentTeacherDataModule


def _fit_ddp(name, folder, **data_kw):
    pl.seed_everything(0)
    rule, dm = make_rule(name, sizes=(6, 6, 6, 6)), tiny_data(sizes=(6, 6, 6, 6), **data_kw)
    return fit_ddp_replicas(rule, dm, folder, max_epochs=2)


# the fast suite keeps RDTPAI: a randomized layer draw, learned feedback with per-rank noise and difference targets in one
# spawn; the other rules are -m slow (each DDP spawn costs 5-20 s on a 2-core machine)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW) for n in ("BP", "TPEI", "RTPEI", "DTPAI")] + ["RDTPAI"]
                         + [pytest.param(n, marks=SLOW) for n in ("OriginalDTP", "LeeDTP")])
def test_replicas_stay_identical(name, tmp_path):
    rank0, rank1 = _fit_ddp(name, tmp_path)
    for a, b in zip(rank0, rank1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    initial = weights_of(make_rule(name, sizes=(6, 6, 6, 6)))
    assert any(not torch.equal(a, b) for a, b in zip(rank0, initial) if a.shape == b.shape)


class TwoRankOrder(Sampler):
    """One process, the samples two DDP ranks see: Lightning shards the training set with
    ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``; step ``k`` of the 2-process run
    uses rank 0's and rank 1's ``k``-th batches, i.e. this sampler's ``k``-th doubled batch."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.b, self.epoch = n, batch_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        ranks = []
        for r in (0, 1):
            s = DistributedSampler(range(self.n), num_replicas=2, rank=r, shuffle=True, seed=0)
            s.set_epoch(self.epoch)
            ranks.append(list(s))
        return iter([i for k in range(0, len(ranks[0]), self.b) for r in ranks for i in r[k : k + self.b]])

    def __len__(self):
        return self.n


class DoubledBatchData(StudentTeacherDataModule):
    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=2 * self.batch_size, sampler=TwoRankOrder(len(self.train_data), self.batch_size), collate_fn=lambda b: b)


@pytest.mark.parametrize("name", [pytest.param("BP", marks=SLOW), "TPEI"])  # TPEI: the gathered rank-2B update, beyond SGD
def test_two_processes_equal_one_process_with_doubled_batch(name, tmp_path):
    """Plain SGD (BP) and the exact-inverse rules (u, v gathered: one rank-2B Woodbury update)."""
    rank0, _ = _fit_ddp(name, tmp_path, batch_size=4, shuffle=False)  # Lightning shards with DistributedSampler
    pl.seed_everything(0)
    rule = make_rule(name, sizes=(6, 6, 6, 6))
    dm = DoubledBatchData(sizes=[6, 6, 6, 6], num_train=64, num_val=32, num_test=32, batch_size=4)
    quiet_trainer(max_epochs=2).fit(rule, datamodule=dm)
    for a, b in zip(rank0, weights_of(rule)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
