"""The one place that chooses the Lightning package; every other module imports ``pl`` from here.

tplightning works with the standalone ``pytorch_lightning`` (the default) and with the unified
``lightning`` package (``import lightning as L``; its trainer lives in ``lightning.pytorch``).
The choice, made once at import time:

1. the environment variable ``TPLIGHTNING_LIGHTNING`` = ``pytorch_lightning`` or ``lightning``;
2. otherwise ``lightning`` if only it has already been imported (``import lightning`` before
   ``import tplightning``), else ``pytorch_lightning``.

The choice is not revised afterwards: ``import tplightning`` and then ``import lightning`` keeps
``pytorch_lightning``. Rules, data modules and callbacks of one package cannot be mixed with a trainer of the
other (Lightning checks classes, not behaviour). :func:`check_same_lightning` turns such a mix into an error that
names both packages and the fix wherever tplightning sees it: a rule checks the trainer and the data module it is
given (its ``configure_callbacks`` hook, which Lightning calls before it prepares the data), the callbacks check the
trainer, and the CLI names a class path of the other package. One mix cannot be seen then: the other package's
``Trainer().fit(rule)`` refuses the rule before any of its hooks runs (Lightning's "``model`` must be a
``LightningModule``"); for it, importing the other package after tplightning warns at once
(:class:`LightningMixWarning`, naming both packages and the fix). The rule for users: import ``lightning`` before ``tplightning`` (or set
``TPLIGHTNING_LIGHTNING=lightning``) when you use ``import lightning as L``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
import warnings

__all__ = ["pl", "cli", "OptimizerCallable", "LightningCLI", "PACKAGE", "ENV_VAR", "check_same_lightning", "package_of"]

ENV_VAR = "TPLIGHTNING_LIGHTNING"
_MODULES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}


def _choose() -> str:
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice:
        if choice not in _MODULES:
            raise ImportError(f"{ENV_VAR}={choice!r} is not a Lightning package; expected 'pytorch_lightning' or 'lightning'")
        return choice
    if "lightning" in sys.modules and "pytorch_lightning" not in sys.modules:
        return "lightning"
    return "pytorch_lightning"


PACKAGE = _choose()
try:
    pl = importlib.import_module(_MODULES[PACKAGE])
    cli = importlib.import_module(_MODULES[PACKAGE] + ".cli")
except ImportError as err:
    extra = "pip install 'tplightning[lightning]'" if PACKAGE == "lightning" else "pip install pytorch-lightning"
    raise ImportError(f"tplightning was asked for the {PACKAGE!r} package ({ENV_VAR}), which is not installed: {extra}") from err
OptimizerCallable = cli.OptimizerCallable
LightningCLI = cli.LightningCLI


class LightningMixWarning(UserWarning):
    """The other Lightning package was imported after tplightning chose its package (see the module's docstring)."""


class _LateImportWatch(importlib.abc.MetaPathFinder):
    """A finder that finds nothing: it only warns, once, when the package tplightning did not choose is imported after
    the choice. That is the one mix no hook of ours can see later (the other package's ``Trainer().fit(rule)`` refuses
    the rule with Lightning's own "``model`` must be a ``LightningModule``"), so the warning names both packages and
    the fix when the import happens."""

    def __init__(self, other: str):
        self.other, self.warned = other, False

    def find_spec(self, name, path=None, target=None):
        if name == self.other and not self.warned and name not in sys.modules:
            self.warned = True
            warnings.warn(
                f"{name!r} is imported after tplightning chose {PACKAGE!r}: the two packages' objects cannot be mixed (a "
                f"{name} Trainer refuses tplightning's rules). Import {name} before tplightning (or set {ENV_VAR}={name}) "
                f"to have tplightning use {name!r}; or use {PACKAGE!r} throughout.",
                LightningMixWarning,
                stacklevel=2,
            )
        return None


_OTHER = "lightning" if PACKAGE == "pytorch_lightning" else "pytorch_lightning"
if _OTHER not in sys.modules:
    sys.meta_path.insert(0, _LateImportWatch(_OTHER))


def package_of(cls: type) -> str | None:
    """The Lightning package (``"pytorch_lightning"`` or ``"lightning"``) whose classes ``cls`` derives from, if any.

    >>> package_of(pl.Callback) == PACKAGE, package_of(int)
    (True, None)
    """
    root = cls.__module__.split(".")[0]
    for klass in cls.__mro__:
        mod = klass.__module__
        if mod.startswith("lightning.pytorch") or mod.startswith("lightning.fabric"):
            return "lightning"
        if mod.startswith("pytorch_lightning") or mod.startswith("lightning_fabric"):
            return "pytorch_lightning"
    return root if root in _MODULES else None


def check_same_lightning(obj, what: str) -> None:
    """Raise ``TypeError`` when ``obj`` (a trainer, data module, ...) comes from the other Lightning package.

    >>> check_same_lightning(pl.Callback(), "a callback")  # the chosen package's: nothing to say
    """
    other = package_of(type(obj))
    if other is not None and other != PACKAGE:
        raise TypeError(
            f"{what} {type(obj).__name__} is a {other!r} object, but tplightning was loaded for {PACKAGE!r} (chosen once, "
            f"when tplightning was first imported); the packages 'pytorch_lightning' and 'lightning' cannot be mixed. "
            f"Use {PACKAGE!r} throughout, or import {other} before tplightning (or set {ENV_VAR}={other}) to have "
            f"tplightning use {other!r}."
        )
