"""The Lightning trainer features of the user guide's table (docs/guide.md) "Trainer features under manual optimization", one test per row
(issue 29, finding 5): mixed precision trains every rule, Lightning refuses automatic clipping and accumulation,
``max_steps`` counts batches, ``val_check_interval`` works."""
import functools
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

import tplightning as tp
from tplightning._lightning import pl
from tplightning.rules import __all__ as RULE_NAMES

ROOT = Path(__file__).resolve().parents[1]
RULES = [getattr(tp, n) for n in RULE_NAMES if isinstance(getattr(tp, n), type) and issubclass(getattr(tp, n), tp.LearningRule)
         and not inspect.isabstract(getattr(tp, n))]


def _row(option: str) -> str:
    """The row of the user guide's table (docs/guide.md) "Trainer features under manual optimization" whose first cell names ``option``."""
    text = (ROOT / "docs" / "guide.md").read_text()
    table = text[text.index("### Trainer features under manual optimization"):]
    match = re.search(rf"^\| `[^|]*{option}[^|]*\|[^\n]*$", table, re.M)
    assert match, f"the user guide's table (docs/guide.md) has no row for {option}"
    return match.group(0)


def _sgd(lr=0.01):
    return functools.partial(torch.optim.SGD, lr=lr)


def _data(batches=4, batch_size=8):
    return tp.StudentTeacherDataModule(sizes=[6, 6, 6], num_train=batches * batch_size, num_val=16, num_test=16, batch_size=batch_size)


def _trainer(**kwargs):
    options = dict(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**options, **kwargs})


def _fit(cls, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    extra = {"aux_units": 2} if cls is tp.AOSDTP else {}  # AOSDTP's default needs a wider penultimate layer
    rule = cls(sizes=[6, 6, 6, 6], forward_optimizer=_sgd(), **extra)
    before = [W.detach().clone() for W in rule.net.weights]
    trainer = _trainer(**trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning: 16-mixed on the CPU runs as bf16-mixed
        trainer.fit(rule, datamodule=_data())
    return rule, [W.detach() - W0 for W, W0 in zip(rule.net.weights, before)], trainer


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("cls", RULES, ids=lambda c: c.__name__)
def test_mixed_precision_trains_every_rule(cls, precision):
    """Row "precision": the step runs under autocast; closed-form gradients are cast to the parameters' dtype."""
    assert "| yes, every rule |" in _row(precision)
    _, full, _ = _fit(cls)
    rule, mixed, _ = _fit(cls, precision=precision)
    assert all(W.dtype == torch.float32 and bool(torch.isfinite(W).all()) for W in rule.net.weights)
    full, mixed = torch.cat([d.flatten() for d in full]), torch.cat([d.flatten() for d in mixed])
    assert float(full.norm()) > 0 and float((mixed - full).norm() / full.norm()) < 0.1  # the updates of full precision, to bf16's accuracy


@pytest.mark.parametrize("cls", [tp.DTPAI, tp.TPEI, tp.FA], ids=lambda c: c.__name__)
def test_a_gradient_scaler_leaves_closed_form_updates_unscaled(cls):
    """With fp16 autocast and a gradient scaler (what ``16-mixed`` is on a GPU) the optimizer's step divides every
    gradient by the scale (65536): the closed-form updates must come out as in full precision, not 65536 times smaller."""
    _, full, _ = _fit(cls)
    plugin = pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    _, mixed, trainer = _fit(cls, plugins=[plugin])
    assert trainer.precision_plugin.scaler.get_scale() == 65536.0
    for a, b in zip(full, mixed):
        assert float((a - b).norm() / a.norm()) < 1e-2


@pytest.mark.parametrize("option, value", [("gradient_clip_val", 1.0), ("accumulate_grad_batches", 2)])
def test_automatic_clipping_and_accumulation_are_refused(option, value):
    """Rows "gradient clipping" and "accumulate_grad_batches": Lightning refuses them at the start of fit for any
    module with manual optimization (the rules compute their updates themselves); the CLI refuses them earlier, with a
    short error (tests/test_refuse_garbage.py)."""
    assert "| no: Lightning stops at the start of `fit`" in _row(option)
    with pytest.raises(Exception, match="not supported for manual optimization"):
        _fit(tp.DTPAI, **{option: value})


@pytest.mark.parametrize("cls", [tp.BP, tp.FA, tp.DTPAI, tp.RTPEI], ids=lambda c: c.__name__)
def test_max_steps_counts_batches(cls):
    """Row "max_steps": it counts batches, whatever optimizer steps a rule takes per batch."""
    assert "| yes, in batches |" in _row("max_steps")
    rule, _, trainer = _fit(cls, max_steps=4, max_epochs=-1)
    assert trainer.global_step == 4
    assert rule.batches_seen == 4


def test_val_check_interval_validates_within_the_epoch():
    """Row "val_check_interval": validation runs every N training batches as with automatic optimization."""
    assert "| yes |" in _row("val_check_interval")
    runs = []

    class Count(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            runs.append(pl_module.batches_seen)

    _fit(tp.DTPAI, val_check_interval=2, callbacks=[Count()])
    assert runs == [2, 4]

