"""Load a checkpoint as the rule that wrote it: ``tplightning.load(path)``.

Every rule records its class in the checkpoints it writes (``checkpoint["tplightning"]["class_path"]``);
checkpoints written through ``LightningCLI`` also carry ``hyper_parameters["_class_path"]``.
``LearningRule.load_from_checkpoint(path)`` on the base class (or on any ancestor of the recorded
class) therefore builds the recorded rule, not the base class. The optimizers are not part of a
rule's hyper-parameters; they are recorded apart (``checkpoint["tplightning"]["optimizers"]``, plain data: the
class path and keyword arguments of each factory) and a loaded rule is rebuilt with them (pass
``forward_optimizer=...`` to override). A checkpoint written before they were recorded gets the rule's default
factories (``torch.optim.SGD`` at torch's default rate, as the signature shows).

Writing: :class:`AtomicCheckpointIO`, Lightning's ``CheckpointIO`` plugin that the
:class:`~tplightning.callbacks.Checkpoint` callback and the CLI install, writes every checkpoint to a temporary
file in the checkpoint's own folder, flushes it to disk, renames it into place and flushes the folder, so a kill
at any moment leaves the previous file or the new one, never a partial file, and no temporary file outside the
folder (a temporary file a kill left behind is removed at the next save into that folder). Each checkpoint carries
a digest of its content (:func:`content_digest`) that :func:`read` checks: a file changed on disk is refused.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ._lightning import pl
from .errors import ConfigError

__all__ = ["load", "read", "recorded_class", "class_path_of", "check_fits", "content_digest", "AtomicCheckpointIO",
           "install_atomic_io", "CHECKSUM_KEY", "describe_factory", "build_factory", "recorded_optimizers"]

#: the checkpoint key holding :func:`content_digest` of the rest of the checkpoint
CHECKSUM_KEY = "tplightning_sha256"
#: the middle of the names of temporary files (``.<name>.tmp-tplightning-<pid>``) written by :class:`AtomicCheckpointIO`
TMP_MARK = ".tmp-tplightning-"


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


def _feed(h, obj) -> None:
    """Add ``obj`` to the hash ``h`` in a form that does not depend on dict order, memory layout or the process."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"{{{len(obj)}".encode())
        for key, value in sorted(obj.items(), key=lambda kv: repr(kv[0])):
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, (set, frozenset)):
        _feed(h, sorted(obj, key=repr))
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"B%d" % len(obj) + bytes(obj))
    elif obj is None or isinstance(obj, (str, int, float, complex)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif hasattr(obj, "tobytes") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        h.update(f"N{obj.dtype}{getattr(obj, 'shape', ())}".encode() + obj.tobytes())
    elif hasattr(obj, "__dict__"):
        h.update(class_path_of(obj).encode())
        _feed(h, vars(obj))
    else:
        h.update(repr(obj).encode())


def content_digest(checkpoint: dict) -> str:
    """The sha256 of a checkpoint's content (every entry but :data:`CHECKSUM_KEY`): tensors by dtype, shape and bytes,
    dicts in key order, other values by their ``repr`` (or their attributes), so the digest of the dict written and
    of the dict read back agree, and any changed bit of a tensor or value changes it.

    >>> a = {"state_dict": {"w": torch.ones(2)}, "epoch": 1}
    >>> content_digest(a) == content_digest({"epoch": 1, "state_dict": {"w": torch.ones(2)}})
    True
    >>> content_digest(a) == content_digest({"state_dict": {"w": torch.tensor([1.0, 1.0000001])}, "epoch": 1})
    False
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without folder handles (Windows): the rename is all it offers
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(folder: str) -> None:
    """Remove the temporary files that a killed save of another process left in ``folder``."""
    own = f"{TMP_MARK}{os.getpid()}"
    for entry in os.scandir(folder):
        if TMP_MARK in entry.name and not entry.name.endswith(own) and entry.is_file():
            try:
                os.remove(entry.path)
            except FileNotFoundError:
                pass


def atomic_write(path, write) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, flush it to disk, rename it to ``path`` and flush the
    folder; on any error (or a kill) ``path`` keeps its previous content.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.txt")
    >>> atomic_write(path, lambda f: f.write(b"hello"))
    >>> open(path, "rb").read(), os.listdir(os.path.dirname(path))
    (b'hello', ['x.txt'])
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder)
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


class AtomicCheckpointIO(pl.plugins.io.TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes local checkpoints atomically, with a content digest.

    ``save_checkpoint`` stores :func:`content_digest` under :data:`CHECKSUM_KEY`, serializes the checkpoint and writes
    it with :func:`atomic_write`: a temporary file in the target's folder (never the system's temporary folder, which
    may be another filesystem, where a rename becomes a copy), ``fsync``, ``os.replace``, ``fsync`` of the folder.
    ``load_checkpoint`` refuses a local file whose digest does not match (:func:`read`). Remote paths (``s3://``...)
    go to Lightning's own writer. Installed by :class:`~tplightning.callbacks.Checkpoint` and by the CLI
    (:func:`install_atomic_io`); pass ``Trainer(plugins=[AtomicCheckpointIO()])`` to use it without them.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.ckpt")
    >>> AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1)}}, path)
    >>> sorted(read(path))
    ['state_dict', 'tplightning_sha256']
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        checkpoint[CHECKSUM_KEY] = content_digest(checkpoint)
        atomic_write(str(path).removeprefix("file://"), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        ckpt = read(path)
        if map_location is not None:  # read loads on the CPU
            ckpt = super().load_checkpoint(path, map_location=map_location, weights_only=False)
        return ckpt


def install_atomic_io(trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it already writes checkpoints with a plugin of its own.

    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> install_atomic_io(trainer)
    >>> type(trainer.strategy.checkpoint_io).__name__
    'AtomicCheckpointIO'
    """
    if type(trainer.strategy.checkpoint_io) is pl.plugins.io.TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def read(checkpoint_path) -> dict:
    """The checkpoint file as a dict, or a short error: ``FileNotFoundError`` for a missing file,
    :class:`~tplightning.errors.ConfigError` for a folder, a file that is not a PyTorch checkpoint (or is truncated or
    corrupt), one whose content does not match its digest (:func:`content_digest`; a checkpoint written without one
    is taken as it is) and one that holds no ``state_dict``.

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
    except (ImportError, AttributeError) as err:  # a class the file names that cannot be imported here: not a corrupt file
        raise ConfigError(f"checkpoint {path} names code this installation does not have ({err}); load it where the code "
                          "that wrote it is installed") from err  # fmt: skip
    except Exception as err:  # pickle, zip-archive and end-of-file errors of a foreign, truncated or corrupt file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
        raise ConfigError(f"checkpoint {path} cannot be read: not a PyTorch checkpoint, or truncated or corrupt ({reason})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} is not a Lightning checkpoint (it holds no state_dict)")
    if CHECKSUM_KEY in ckpt and ckpt[CHECKSUM_KEY] != content_digest(ckpt):
        raise ConfigError(f"checkpoint {path}: checksum mismatch: the file is corrupt")
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


def describe_factory(factory) -> dict | None:
    """An optimizer factory as plain data, ``{"class_path", "init_args"}``, or ``None`` when it is not an optimizer class
    or a ``functools.partial`` of one with keyword arguments only (as Python code and jsonargparse's configs build it).

    >>> describe_factory(functools.partial(torch.optim.AdamW, lr=0.003, weight_decay=0.05))
    {'class_path': 'torch.optim.adamw.AdamW', 'init_args': {'lr': 0.003, 'weight_decay': 0.05}}
    >>> describe_factory(lambda params: torch.optim.SGD(params, lr=0.1)) is None
    True
    """
    def optimizer_class(obj) -> bool:
        return isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)

    if optimizer_class(factory):
        return {"class_path": class_path_of(factory), "init_args": {}}
    if not isinstance(factory, functools.partial):
        return None
    if optimizer_class(factory.func) and not factory.args:
        cls = factory.func
    else:  # jsonargparse's partial(call_without_instantiate_context, instantiator, cls, **init_args)
        classes = [a for a in factory.args if optimizer_class(a)]
        if len(classes) != 1 or factory.args[-1] is not classes[0] or getattr(factory.func, "__module__", "").split(".")[0] != "jsonargparse":
            return None
        cls = classes[0]
    return {"class_path": class_path_of(cls), "init_args": dict(factory.keywords)}


def build_factory(description: dict):
    """The optimizer factory that :func:`describe_factory` described: ``functools.partial(cls, **init_args)``.

    >>> build_factory({"class_path": "torch.optim.adamw.AdamW", "init_args": {"lr": 0.003}})
    functools.partial(<class 'torch.optim.adamw.AdamW'>, lr=0.003)
    """
    return functools.partial(_import(description["class_path"]), **description.get("init_args", {}))


def recorded_optimizers(ckpt: dict, checkpoint_path="checkpoint") -> dict:
    """``{argument: factory}`` for the optimizer factories a checkpoint records (``checkpoint["tplightning"]
    ["optimizers"]``); a factory that could not be recorded is left out, with a warning; a checkpoint written before
    they were recorded gives ``{}``.

    >>> recorded_optimizers({"tplightning": {"optimizers": {"forward_optimizer": {"class_path": "torch.optim.SGD",
    ...                                                                         "init_args": {"lr": 0.1}}}}})
    {'forward_optimizer': functools.partial(<class 'torch.optim.sgd.SGD'>, lr=0.1)}
    """
    found = {}
    for name, description in ((ckpt.get("tplightning") or {}).get("optimizers") or {}).items():
        if description is None:
            warnings.warn(f"{checkpoint_path}: {name} was not an optimizer class or a partial of one, so it was not "
                          f"recorded; the loaded rule has its default {name}; pass {name}=... to choose it", UserWarning, stacklevel=3)  # fmt: skip
            continue
        found[name] = build_factory(description)
    return found


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
    trial.on_load_checkpoint(ckpt)  # outside the try: a bug of a migration keeps its traceback
    try:
        trial.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {checkpoint_path} does not fit the configured {type(model).__name__}: "
                         f"{_mismatch(str(err))} (the config differs from the run that wrote it)") from err


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
