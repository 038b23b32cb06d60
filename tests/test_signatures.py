"""Every public rule and layer declares its arguments: ``inspect.signature`` (hence ``help()``, IDEs and the CLI) shows each
argument with its default, never a ``*args``/``**kwargs`` pass-through (issue 29, finding 2)."""
import inspect
from pathlib import Path

import pytest
import torch

import tplightning as tp
from tplightning import layers
from tplightning.errors import ConfigError
from tplightning.rules import __all__ as RULE_NAMES

ROOT = Path(__file__).resolve().parents[1]
RULES = [getattr(tp, name) for name in RULE_NAMES if isinstance(getattr(tp, name), type) and issubclass(getattr(tp, name), tp.LearningRule)]
LAYERS = [layers.Dense, layers.AuxiliaryDense, layers.Conv2d, layers.Network]
PASS_THROUGH = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@pytest.mark.parametrize("cls", RULES + LAYERS, ids=lambda c: c.__name__)
def test_no_pass_through(cls):
    params = inspect.signature(cls).parameters
    assert [p.name for p in params.values() if p.kind in PASS_THROUGH] == []


def test_rules_are_all_checked():
    assert {"DTPAI", "LeeDTP", "FA", "BDFA", "TPEI", "DRL", "LDRL", "DDTPLinear", "MTP", "AOSDTP", "BPFixed", "FWDTP", "CCL", "WM"} <= {c.__name__ for c in RULES}


def test_dtpai_shows_its_arguments_with_defaults():
    params = inspect.signature(tp.DTPAI).parameters
    for name in ("sizes", "network", "loss", "forward_optimizer", "target_stepsize", "feedback_optimizer"):
        assert name in params, name
    assert params["target_stepsize"].default == 0.1
    assert params["feedback_optimizer"].default is torch.optim.SGD
    assert params["sizes"].default == (6, 6, 6)
    assert tp.DTPAI([3, 4, 2]).net.sizes == [3, 4, 2]  # sizes and the base's arguments may still come by position


@pytest.mark.parametrize("cls, name, default", [
    (tp.FA, "target_stepsize", 1.0), (tp.BDFA, "target_stepsize", 1.0), (tp.DRL, "feedback_noise_std", 0.05),
    (tp.LDRL, "feedback_iterations", 20), (tp.DDTPLinear, "feedback_noise_std", 0.1), (tp.MTP, "batch_norm", True),
    (tp.AOSDTP, "aux_units", None), (tp.TPEI, "threshold", 0.5), (tp.LeeDTP, "feedback_init", "pinv"),
    (tp.FWDTP, "feedback_scale", 1.0), (tp.CCL, "target_stepsize", 1.0), (tp.CCL, "pairing", "mse"), (tp.CCL, "grad_clip", None),
    (tp.WM, "mirror_lr", 0.1), (tp.WM, "mirror_weight_decay", None), (tp.WM, "mirror_initial_steps", 0),
    (tp.LDRL, "feedback_activation", "lower"),
])
def test_presets_show_their_own_defaults(cls, name, default):
    """The signature's default is the one the rule records when the argument is left out."""
    params = inspect.signature(cls).parameters
    assert params[name].default == default and not any(p.kind in PASS_THROUGH for p in params.values())
    sizes = [3, 5, 2] if cls is tp.AOSDTP else [3, 4, 4]
    assert cls(sizes=sizes).hparams[name] == default


def test_bpfixed_records_the_output_layer():
    assert inspect.signature(tp.BPFixed).parameters["train_layers"].default == (-1,)
    assert tp.BPFixed(sizes=[3, 4, 2]).hparams["train_layers"] == [-1]  # as checkpoints hold it
    with pytest.raises(ConfigError, match="only the output layer"):
        tp.BPFixed(sizes=[3, 4, 2], train_layers=[1])


def test_help_lists_the_arguments():
    text = inspect.getdoc(tp.DTPAI) + str(inspect.signature(tp.DTPAI))
    assert "target_stepsize: 'float' = 0.1" in text or "target_stepsize: float = 0.1" in text


def test_docs_site_checks_documented_arguments():
    """griffe warns (and the strict build fails) on a documented argument that the signature lacks."""
    assert "warn_unknown_params: true" in (ROOT / "mkdocs.yml").read_text()


def _named_parameters(function) -> set[str]:
    """The arguments ``function`` declares by name (not ``self``, not a ``*args``/``**kwargs`` pass-through)."""
    return {p.name for p in inspect.signature(function).parameters.values() if p.kind not in PASS_THROUGH} - {"self"}


@pytest.mark.parametrize("cls", RULES, ids=lambda c: c.__name__)
def test_every_base_argument_is_declared(cls):
    """A rule that writes its own signature repeats every argument of every ``__init__`` above it in its MRO: one that
    is left out could no longer be given to that rule (by keyword, in a config) though its base takes it."""
    own = _named_parameters(cls.__init__)
    bases = [base for base in cls.__mro__[1:] if "__init__" in vars(base)]
    assert cls is tp.LearningRule or tp.LearningRule in bases, "the check must reach the base of the rules"
    missing = {base.__qualname__: sorted(_named_parameters(base.__init__) - own) for base in bases}
    assert {name: args for name, args in missing.items() if args} == {}
