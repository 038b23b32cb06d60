"""Feedback schedules (issue 31, item 3): every k-th batch, a decreasing count, a stopping rule on the feedback loss and
the closed form, as the option ``feedback_schedule`` of the rules that learn their feedback weights. Counts are read
from the feedback optimizer's own step hook; the closed form is compared with ``torch.linalg.pinv``; the loss the
stopping rule reads is recomputed with plain matrix products."""
from __future__ import annotations

import functools

import pytest
import torch

import tplightning as tp
from conftest import quiet_trainer, tiny_data
from tplightning._lightning import pl
from tplightning.errors import ConfigError
from tplightning.schedules import FeedbackSchedule

SGD = functools.partial(torch.optim.SGD, lr=0.01)
BATCHES = 8  # tiny_data: 64 samples, batch 8


class CountFeedbackSteps(pl.Callback):
    """Counts the feedback optimizer's steps per epoch (a torch step hook on the optimizer itself)."""

    def __init__(self):
        self.per_epoch: list[int] = []

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) > 1:  # the closed form has no feedback optimizer
            trainer.optimizers[1].register_step_post_hook(lambda *_: self.per_epoch.__setitem__(-1, self.per_epoch[-1] + 1))

    def on_train_epoch_start(self, trainer, pl_module):
        self.per_epoch.append(0)


def _fit(cls, epochs: int = 1, sizes=(6, 6, 6, 4), **kw) -> tuple[tp.LearningRule, list[int]]:
    pl.seed_everything(0, verbose=False)
    rule = cls(sizes=list(sizes), forward_optimizer=SGD, feedback_optimizer=SGD, **kw)
    counter = CountFeedbackSteps()
    quiet_trainer(max_epochs=epochs, callbacks=[counter]).fit(rule, datamodule=tiny_data(sizes=sizes))
    return rule, counter.per_epoch


@pytest.mark.parametrize("cls, per_batch", [(tp.DDTPLinear, 1), (tp.DRL, 2), (tp.DTPAI, 3)], ids=["DDTPLinear", "DRL", "DTPAI"])
def test_every_k_takes_k_fold_fewer_feedback_steps(cls, per_batch):
    kw = {"feedback_iterations": per_batch}
    counts = {k: sum(_fit(cls, 2, **kw, feedback_schedule=FeedbackSchedule(every=k))[1]) for k in (1, 2, 4)}
    assert sum(_fit(cls, 2, **kw)[1]) == 2 * BATCHES * per_batch  # no schedule
    assert counts == {1: 16 * per_batch, 2: 8 * per_batch, 4: 4 * per_batch}


def test_the_decreasing_count_by_epoch():
    linear = FeedbackSchedule(iterations=4, final_iterations=1, decay_epochs=3)
    assert _fit(tp.DDTPLinear, 5, feedback_schedule=linear)[1] == [32, 24, 16, 8, 8]  # 4, 3, 2, 1 per batch, floor 1
    geometric = FeedbackSchedule(iterations=4, final_iterations=0.5, decay_epochs=3, decay="geometric")
    assert _fit(tp.DDTPLinear, 5, feedback_schedule=geometric)[1] == [32, 16, 8, 4, 4]  # 4, 2, 1, 1/2: every 2nd batch
    with_every = FeedbackSchedule(every=2, iterations=3, final_iterations=0, decay_epochs=2)
    assert _fit(tp.DRL, 3, feedback_schedule=with_every)[1] == [12, 6, 0]  # 4 updating batches of 3, 1.5, 0


def test_fractional_counts_spread_over_the_batches():
    s = FeedbackSchedule(iterations=0.25)
    assert [s.updates(0, b, 1) for b in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]


def _with_losses(rule, values: list[float]):
    """Make the rule's feedback loss read ``values`` in turn (one per measured update), the gradients left as they are."""
    real, it = rule.feedback_grads, iter(values)

    def feedback_grads(hs, pre=None, losses=None):
        grads = real(hs, pre, losses)
        if losses is not None:
            losses[:] = [torch.tensor(next(it))]
        return grads

    rule.feedback_grads = feedback_grads


class _PerBatch(pl.Callback):
    def __init__(self):
        self.steps: list[int] = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[1].register_step_post_hook(lambda *_: self.steps.__setitem__(-1, self.steps[-1] + 1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(0)


@pytest.mark.parametrize("rest, expected", [(0, [1, 0, 0, 1, 1, 0, 1, 1]), (1, [1, 0, 0, 0, 0, 1, 1, 0])])
def test_the_threshold_skips_below_and_trains_above(rest, expected):
    pl.seed_everything(0, verbose=False)
    rule = tp.DDTPLinear(sizes=[6, 6, 6, 4], forward_optimizer=SGD, feedback_optimizer=SGD,
                         feedback_schedule=FeedbackSchedule(threshold=0.5, rest=rest))  # fmt: skip
    _with_losses(rule, [0.9, 0.1, 0.2, 0.7, 0.8, 0.3, 0.6, 0.9])
    per_batch = _PerBatch()
    quiet_trainer(callbacks=[per_batch]).fit(rule, datamodule=tiny_data(sizes=(6, 6, 6, 4)))
    # rest 1: the batch after a skip measures nothing, so the losses are read at batches 0, 1, 3, 5, 6, 7
    assert per_batch.steps == expected


def test_the_plateau_rule_compares_with_the_mean_of_the_updates_taken():
    s, state = FeedbackSchedule(plateau=0.1, momentum=0.5), FeedbackSchedule().initial_state()
    decisions = [s.skip(v, state) for v in (1.0, 1.05, 2.0, 1.5, 1.6, 1.6)]
    # 1.0 starts the mean; 1.05 <= 1.1: skip (mean stays 1.0); 2.0 > 1.1: train, mean 1.5; 1.5 <= 1.65: skip;
    # 1.6 <= 1.65: skip; the skipped values never entered the mean
    assert decisions == [False, True, False, True, True, True] and state["mean"] == 1.5


def test_the_stopping_rule_measures_the_drl_loss_of_ddtp_linear():
    """The loss the stopping rule reads: ``sum_i 1/(2 sigma^2 B) ||Q_i (f_{i,L}(h_i + sigma eps) - h_L) - sigma eps||^2``,
    recomputed here with plain tanh matrix products and the same noise stream."""
    torch.manual_seed(1)
    rule = tp.DDTPLinear(sizes=[5, 6, 6, 3], activation="tanh", feedback_noise_std=0.3, feedback_seed=4)
    x = torch.randn(7, 5)
    hs, pre = rule.forward_pass(x)
    losses: list[torch.Tensor] = []
    rule.feedback_grads(hs, pre, losses)
    W = [w.detach().double() for w in rule.net.weights]
    gen, sigma = torch.Generator().manual_seed(4), 0.3
    h = [x.double()]
    for k, w in enumerate(W):
        h.append(h[-1] @ w.T if k == 2 else torch.tanh(h[-1] @ w.T))
    expected = []
    for i in (1, 2):
        eps = sigma * torch.randn(7, 6, generator=gen).double()
        up = h[i] + eps
        for k in range(i, 3):
            up = up @ W[k].T if k == 2 else torch.tanh(up @ W[k].T)
        r = (up - h[3]) @ rule.feedback_weights[i - 1].detach().double().T - eps
        expected.append(0.5 * r.pow(2).sum() / (sigma**2 * 7))
    torch.testing.assert_close(torch.stack(losses).double(), torch.stack(expected), rtol=1e-5, atol=1e-7)


def test_closed_form_sets_the_pseudo_inverses():
    rule, counts = _fit(tp.DTPAI, 1, feedback_schedule=FeedbackSchedule(closed_form=True))
    assert counts == [0]  # no optimizer step: the maps are set, not trained
    for i, Q in enumerate(rule.feedback_weights, start=1):  # set after the last forward update
        torch.testing.assert_close(Q.detach(), torch.linalg.pinv(rule.net.weights[i].detach()), rtol=0, atol=1e-5)
    rule, _ = _fit(tp.DDTPLinear, 1, feedback_schedule=FeedbackSchedule(closed_form=True))
    W = [w.detach() for w in rule.net.weights]
    torch.testing.assert_close(rule.feedback_weights[0].detach(), torch.linalg.pinv(W[2] @ W[1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(rule.feedback_weights[1].detach(), torch.linalg.pinv(W[2]), rtol=0, atol=1e-5)
    assert len(rule.build_optimizers()) == 1  # nothing to train: no feedback optimizer (and no scheduler warning)


def test_closed_form_every_k_batches_only():
    """``every=3``: the maps are set at batches 0, 3 and 6 of 8, so after the fit they hold the pseudo-inverse of the
    weights as they were after batch 6, not the final ones."""
    seen = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.net.weights[2].detach().clone())

    pl.seed_everything(0, verbose=False)
    rule = tp.DTPAI(sizes=[6, 6, 6, 4], forward_optimizer=SGD, feedback_schedule=FeedbackSchedule(every=3, closed_form=True))
    quiet_trainer(callbacks=[Keep()]).fit(rule, datamodule=tiny_data(sizes=(6, 6, 6, 4)))
    Q2 = rule.feedback_weights[1].detach()
    torch.testing.assert_close(Q2, torch.linalg.pinv(seen[6]), rtol=0, atol=1e-5)
    assert not torch.allclose(Q2, torch.linalg.pinv(seen[7]), atol=1e-5)


@pytest.mark.parametrize("cls", [tp.DRL, tp.LDRL, tp.OriginalDTP, tp.LeeDTP])
def test_closed_form_is_refused_by_name_where_the_loss_has_none(cls):
    with pytest.raises(ConfigError, match=rf"^feedback_schedule closed_form needs .*; {cls.__name__} has \w+"):
        cls(sizes=[6, 6, 6, 4], feedback_schedule=FeedbackSchedule(closed_form=True))


@pytest.mark.parametrize("kw, message", [
    ({"every": 0}, "FeedbackSchedule every must be an integer >= 1, got 0"),
    ({"every": 1.5}, "FeedbackSchedule every must be an integer >= 1, got 1.5"),
    ({"iterations": 0}, "FeedbackSchedule iterations must be > 0 (or None for the rule's feedback_iterations), got 0"),
    ({"final_iterations": -1}, "FeedbackSchedule final_iterations must be >= 0 (or None for no decay), got -1"),
    ({"final_iterations": 0, "decay": "geometric"}, "FeedbackSchedule final_iterations must be > 0 for decay 'geometric', got 0"),
    ({"decay": "cosine"}, "FeedbackSchedule decay must be 'linear' or 'geometric', got 'cosine'"),
    ({"decay_epochs": 0}, "FeedbackSchedule decay_epochs must be an integer >= 1, got 0"),
    ({"threshold": -0.1}, "FeedbackSchedule threshold must be >= 0 (or None), got -0.1"),
    ({"plateau": -1}, "FeedbackSchedule plateau must be >= 0 (or None), got -1"),
    ({"momentum": 1.0}, "FeedbackSchedule momentum must be in [0, 1), got 1.0"),
    ({"rest": -1}, "FeedbackSchedule rest must be an integer >= 0, got -1"),
    ({"closed_form": True, "iterations": 2}, "FeedbackSchedule closed_form sets the maps every `every` batches; it takes no "
                                             "iterations, final_iterations, threshold or plateau"),
])  # fmt: skip
def test_bad_options_are_refused_by_name(kw, message):
    with pytest.raises(ConfigError) as err:
        FeedbackSchedule(**kw)
    assert str(err.value) == message


def test_a_rule_refuses_what_is_not_a_schedule():
    with pytest.raises(ConfigError, match=r"^feedback_schedule must be a tplightning.FeedbackSchedule \(or None\), got int$"):
        tp.DDTPLinear(sizes=[6, 6, 4], feedback_schedule=2)


def test_the_rule_records_the_schedule_as_plain_data_and_a_checkpoint_rebuilds_it(tmp_path):
    pl.seed_everything(0, verbose=False)
    rule = tp.DRL(sizes=[6, 6, 6, 4], forward_optimizer=SGD, feedback_schedule=FeedbackSchedule(every=2, plateau=0.0, rest=1))
    trainer = quiet_trainer(enable_checkpointing=True, callbacks=[tp.Checkpoint(dirpath=tmp_path, save_top_k=0)])
    trainer.fit(rule, datamodule=tiny_data(sizes=(6, 6, 6, 4)))
    loaded = tp.load(tmp_path / "last.ckpt")
    assert repr(loaded.feedback_schedule) == repr(rule.feedback_schedule)
    assert loaded.hparams["feedback_schedule"]["rest"] == 1 and loaded.schedule_state == rule.schedule_state


@pytest.mark.slow  # a 2-process spawn: about 35 s on the shared 2-core machine
def test_ddp_replicas_take_the_same_stopping_decisions(tmp_path):
    """Two gloo processes, each drawing its own feedback noise: the stopping rule reads the replica-averaged loss, so both
    ranks skip the same updates and the feedback weights stay identical."""
    from conftest import fit_ddp_replicas

    pl.seed_everything(0, verbose=False)
    rule = tp.DRL(sizes=[6, 6, 6, 6], forward_optimizer=SGD, feedback_optimizer=SGD,
                  feedback_schedule=FeedbackSchedule(plateau=0.0, rest=1))  # fmt: skip
    rank0, rank1 = fit_ddp_replicas(rule, tiny_data(sizes=(6, 6, 6, 6)), tmp_path, max_epochs=2)
    for a, b in zip(rank0, rank1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
