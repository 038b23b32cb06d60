"""Load a checkpoint as the rule that wrote it: ``tplightning.load(path)``.

Every rule records its class in the checkpoints it writes (``checkpoint["tplightning"]["class_path"]``);
checkpoints written through ``LightningCLI`` also carry ``hyper_parameters["_class_path"]``.
``LearningRule.load_from_checkpoint(path)`` on the base class (or on any ancestor of the recorded
class) therefore builds the recorded rule, not the base class. The optimizers are not part of a
rule's hyper-parameters: a loaded rule gets the default (SGD) optimizer factories, which matters
only for further training; pass ``forward_optimizer=...`` to override.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

__all__ = ["load", "recorded_class", "class_path_of"]


def class_path_of(obj_or_cls) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def recorded_class(checkpoint_path, base: type | None = None) -> type:
    """The rule class a checkpoint was written by; ``base`` when it records none.

    Raises ``TypeError`` when the recorded class is not a subclass of ``base``.
    """
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    path = (ckpt.get("tplightning") or {}).get("class_path") or (ckpt.get("hyper_parameters") or {}).get("_class_path")
    if path is None:
        if base is None:
            raise ValueError(f"checkpoint {checkpoint_path} records no tplightning rule class; load it with RuleClass.load_from_checkpoint")
        return base
    cls = _import(path)
    if base is not None and not issubclass(cls, base):
        raise TypeError(f"checkpoint {checkpoint_path} holds a {path}, which is not a {class_path_of(base)}")
    return cls


def load(checkpoint_path: str | Path, map_location=None, **kwargs):
    """The rule stored in ``checkpoint_path``, built as the class that wrote it (weights, inverses, extra state)."""
    from .rules.base import LearningRule

    cls = recorded_class(checkpoint_path, LearningRule)
    return cls.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)
