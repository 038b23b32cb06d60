"""No rule makes the host wait for the device inside a training batch (issue 16: the GPU path has no per-batch sync)."""
from __future__ import annotations

import pytest
import torch

from tplightning._lightning import pl

import tplightning as tp
from conftest import RULES, SHARED_DATA, make_rule, quiet_trainer
from benchmarks import syncs
from benchmarks.speed import SyntheticData

# exact-inverse rules read their finiteness flag every step and check singular values by design (ExactInverseRule); the
# Gauss-Newton reference decides on each step from the batch loss (its trust region) and solves on the host
FEEDBACK_RULES = [n for n, (cls, _) in RULES.items() if not issubclass(cls, (tp.ExactInverseRule, tp.GaussNewton))]


def reads_of(rule, task: str, batches: int = 6, log_every: int = 3) -> syncs.HostReads:
    reads = syncs.HostReads()
    dm = SyntheticData(6, rule.output_dim, 8 * batches, 8, task)
    quiet_trainer(limit_val_batches=0, log_every_n_steps=log_every, callbacks=[reads]).fit(rule, datamodule=dm)
    return reads


@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("name", FEEDBACK_RULES)
def test_a_training_batch_reads_nothing_back_but_the_logging_ones(name, task):
    kw = {"loss": "cross_entropy"} if task == "classification" else {}
    reads = reads_of(make_rule(name, sizes=(6, 6, 6, 4), **kw), task)
    assert len(reads.per_batch) == 6
    for k, c in enumerate(reads.per_batch):
        if (k + 1) % 3:
            assert not c, f"batch {k} read the device at {dict(c)}"
        else:  # the deferred finiteness flags are read once per logging step; the counter sees that read
            assert any(w.startswith("tplightning/rules/base.py:") for w in c), dict(c)


class ReadsItsLoss(tp.DTPAI):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.last_loss = float(self.loss_from_output(self(batch[0]), batch[1]).detach())  # a host read per batch
        self.flags = torch.isfinite(self.net.weights[0]).cpu()  # and another
        self.positive = batch[0][batch[0] > 0]  # boolean-mask indexing counts its mask: a third
        return out


def test_the_counter_names_every_read_and_where():
    reads = reads_of(ReadsItsLoss(sizes=[6, 6, 4], forward_optimizer=torch.optim.SGD,
                                  feedback_optimizer=torch.optim.SGD), "regression", batches=2, log_every=100)  # fmt: skip
    here = {w.split(":")[0] for c in reads.per_batch for w in c}
    assert here == {"test_syncs.py"}
    assert [sum(c.values()) for c in reads.per_batch] == [3, 3]


class ReadsInTheOptimizerStep(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # Lightning runs it inside torch's step
        self.norm = float(pl_module.net.weights[0].norm())


def test_a_hook_inside_the_optimizer_step_is_no_optimizer_code():
    reads = syncs.HostReads()
    rule = make_rule("BP", sizes=(6, 6, 4))
    dm = SyntheticData(6, 4, 16, 8, "regression")
    quiet_trainer(limit_val_batches=0, log_every_n_steps=100, callbacks=[ReadsInTheOptimizerStep(), reads]).fit(rule, datamodule=dm)
    assert [{w.split(":")[0] for w in c} for c in reads.per_batch] == [{"test_syncs.py"}] * 2
    assert rule.divergence.defer is None  # the rule's own setting again after the run


def test_one_hot_labels_would_read_the_device(monkeypatch):
    # the cross-entropy output target once built its labels with one_hot, which checks the labels' range on the host
    monkeypatch.setattr(tp.losses.CrossEntropy, "labels", lambda self, y, n, dtype=None: torch.nn.functional.one_hot(y.long(), n).to(dtype))
    reads = reads_of(make_rule("LeeDTP", sizes=(6, 6, 4), loss="cross_entropy"), "classification", batches=2, log_every=100)
    assert all(sum(c.values()) > 0 for c in reads.per_batch)


def test_host_side_reads_are_not_counted(monkeypatch):
    # the randomized rules draw their layer from a CPU generator: a host read on every device, so not counted
    reads = reads_of(make_rule("RDTPAI", sizes=(6, 6, 6, 4)), "regression", batches=2, log_every=100)
    assert not any(reads.per_batch)
    monkeypatch.setattr(syncs, "HOST_SIDE", {})
    reads = reads_of(make_rule("RDTPAI", sizes=(6, 6, 6, 4)), "regression", batches=2, log_every=100)
    assert [{w.split(":")[0] for w in c} for c in reads.per_batch] == [{"tplightning/selection.py"}] * 2


@pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason=f"MNIST files not found under {SHARED_DATA}")
def test_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "RESULTS.md"
    res = dict(syncs.main(["--rules", "BP", "DTPAI", "--batches", "4", "--log-every", "2", "--out", str(out)]))
    text = out.read_text()
    assert "<!-- syncs:cpu:start -->" in text and "--batches 4 --log-every 2 --rules BP DTPAI" in text
    assert res["DTPAI"]["plain"] == [0, 0] and len(res["DTPAI"]["logging"]) == 2
    assert "| DTPAI | `mnist/dtp_ai.yaml` | 0 |" in text


def test_log_every_must_fit_the_batches(capsys):
    with pytest.raises(SystemExit):
        syncs.parse_args(["--batches", "4", "--log-every", "5"])
    assert "--log-every must be in [1, --batches], got --log-every 5 with --batches 4" in capsys.readouterr().err
