"""Load a checkpoint as the rule that wrote it: ``tplightning.load(path)``.

Every rule records its class in the checkpoints it writes (``checkpoint["tplightning"]["class_path"]``);
checkpoints written through ``LightningCLI`` also carry ``hyper_parameters["_class_path"]``.
``LearningRule.load_from_checkpoint(path)`` on the base class (or on any ancestor of the recorded
class) therefore builds the recorded rule, not the base class. The optimizers are not part of a
rule's hyper-parameters: a loaded rule gets the default (SGD) optimizer factories, which matters
only for further training; pass ``forward_optimizer=...`` to override.
"""
from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path

import torch

from .errors import ConfigError

__all__ = ["load", "read", "recorded_class", "class_path_of", "check_fits"]


def class_path_of(obj_or_cls) -> str:
    """The import path of a class (or of an object's class), as checkpoints record it.

    >>> class_path_of(torch.nn.Linear)
    'torch.nn.modules.linear.Linear'
    """
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def read(checkpoint_path) -> dict:
    """The checkpoint file as a dict, or a short error: ``FileNotFoundError`` for a missing file,
    :class:`~tplightning.errors.ConfigError` for a folder, a file that is not a PyTorch checkpoint (or is truncated or
    corrupt) and one that holds no ``state_dict``.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.ckpt")
    >>> torch.save({"state_dict": {}, "epoch": 3}, path)
    >>> read(path)["epoch"]
    3
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.ckpt"))
        raise ConfigError(f"checkpoint {path} is a folder; give a .ckpt file" + (f" in it ({', '.join(inside)})" if inside else ""))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip-archive and end-of-file errors of a foreign, truncated or corrupt file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
        raise ConfigError(f"checkpoint {path} cannot be read: not a PyTorch checkpoint, or truncated or corrupt ({reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} is not a Lightning checkpoint (it holds no state_dict)")
    return ckpt


def _recorded_path(ckpt: dict) -> str | None:
    return (ckpt.get("tplightning") or {}).get("class_path") or (ckpt.get("hyper_parameters") or {}).get("_class_path")


def recorded_class(checkpoint_path, base: type | None = None) -> type:
    """The rule class a checkpoint was written by; ``base`` when it records none.

    Raises ``TypeError`` when the recorded class is not a subclass of ``base``, and :func:`read`'s errors for a file
    that is no checkpoint.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.ckpt")
    >>> torch.save({"state_dict": {}, "tplightning": {"class_path": "tplightning.rules.learned.DTPAI"}}, path)
    >>> recorded_class(path).__name__
    'DTPAI'
    """
    path = _recorded_path(read(checkpoint_path))
    if path is None:
        if base is None:
            raise ConfigError(f"checkpoint {checkpoint_path} records no tplightning rule class; load it with the rule's own "
                              "class, e.g. tplightning.DTPAI.load_from_checkpoint(path)")  # fmt: skip
        return base
    cls = _import(path)
    if base is not None and not issubclass(cls, base):
        raise TypeError(f"checkpoint {checkpoint_path} holds a {path}, which is not a {class_path_of(base)}")
    return cls


def load(checkpoint_path: str | Path, map_location=None, **kwargs):
    """The rule stored in ``checkpoint_path``, built as the class that wrote it (weights, inverses, extra state).

    >>> import tempfile, os, tplightning as tp
    >>> path = os.path.join(tempfile.mkdtemp(), "bp.ckpt")
    >>> rule = tp.BP(sizes=[2, 3, 1])
    >>> checkpoint = {"state_dict": rule.state_dict(), "hyper_parameters": dict(rule.hparams),
    ...               "pytorch-lightning_version": tp._lightning.pl.__version__}
    >>> rule.on_save_checkpoint(checkpoint)
    >>> torch.save(checkpoint, path)
    >>> type(load(path)).__name__
    'BP'
    """
    cls = recorded_class(checkpoint_path)
    if not callable(getattr(cls, "load_from_checkpoint", None)):
        raise TypeError(f"checkpoint {checkpoint_path} holds a {class_path_of(cls)}, which is not a tplightning rule")
    return cls.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)


def check_fits(model, checkpoint_path, ckpt: dict | None = None) -> None:
    """:class:`~tplightning.errors.ConfigError` unless ``model`` can take the weights of ``checkpoint_path`` (``ckpt``: the file already
    :func:`read`): the class it records is the model's (or one related by inheritance), and a trial load into a copy
    of the model (through ``on_load_checkpoint``, which migrates older checkpoints, and a strict ``load_state_dict``)
    succeeds; a config whose sizes, layers or options differ from the run that wrote it fails here, the first
    mismatch named (a :class:`~tplightning.errors.ConfigError`).

    >>> import tplightning as tp
    >>> ckpt = {"state_dict": tp.BP(sizes=[2, 3, 1]).state_dict()}
    >>> check_fits(tp.BP(sizes=[2, 3, 1]), "bp.ckpt", ckpt)
    >>> check_fits(tp.BP(sizes=[2, 4, 1]), "bp.ckpt", ckpt)
    Traceback (most recent call last):
    ...
    tplightning.errors.ConfigError: checkpoint bp.ckpt does not fit the configured BP: net.layers.0.weight is [3, 2] there and [4, 2] here (the config differs from the run that wrote it)
    """
    ckpt = read(checkpoint_path) if ckpt is None else ckpt
    recorded, own = _recorded_path(ckpt), class_path_of(model)
    try:
        cls = _import(recorded) if recorded else None
    except (ImportError, AttributeError, ValueError):
        cls = None  # a class this interpreter cannot import: the trial load still checks the weights
    if cls is not None and not (isinstance(model, cls) or issubclass(cls, type(model))):
        raise ConfigError(f"checkpoint {checkpoint_path} was written by {recorded}, but the model is {own}; "
                         "use the config of the run that wrote it")  # fmt: skip
    trial, ckpt = copy.deepcopy(model), copy.deepcopy(ckpt)  # on_load_checkpoint migrates old checkpoints in place
    try:
        trial.on_load_checkpoint(ckpt)
        trial.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {checkpoint_path} does not fit the configured {type(model).__name__}: "
                         f"{_mismatch(str(err))} (the config differs from the run that wrote it)") from None


def _mismatch(message: str) -> str:
    """The first problem of ``load_state_dict``'s error, in a few words."""
    if m := re.search(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                      r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", message):  # fmt: skip
        return f"{m.group(1)} is {m.group(2)} there and {m.group(3)} here"
    for label, verb in (("Missing", "lacks"), ("Unexpected", "has")):
        if m := re.search(label + r' key\(s\) in state_dict: ([^\n]*)\.', message):
            keys = re.findall(r'"([^"]+)"', m.group(1))
            more = f" and {len(keys) - 2} more" if len(keys) > 2 else ""
            return f"it {verb} {', '.join(keys[:2])}{more}" + (" besides" if verb == "has" else "")
    return (message.strip().splitlines() or ["the weights do not load"])[-1].strip()[:160]
