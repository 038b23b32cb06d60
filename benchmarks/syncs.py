"""Host reads per training batch: does a rule's step make the host wait for the device?

On a GPU, every read of a device value by the host (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``,
``.cpu()``, ``nonzero``, boolean-mask indexing) waits until the device has run everything queued before it, so the
host cannot queue the next kernels meanwhile: with small networks that idles the GPU for most of a step. The rules are
written to read nothing per batch; the finiteness check's flags stay on the device and are read once per logging step
(:meth:`~tplightning.rules.base.LearningRule.check_finite`).

``python -m benchmarks.syncs`` runs each MNIST config through ``train.py``'s CLI for a few batches and counts
the reads in each training batch (the rule's ``training_step`` and the callbacks' batch-end hooks),
with the batches that log (every ``--log-every``) counted apart. On CUDA, :func:`torch.cuda.set_sync_debug_mode` reports every
synchronizing operation. On a CPU nothing waits, but the same reads are found by name (:class:`HostReads`), with the
finiteness check deferred as on an accelerator. A test runs every rule with learned or fixed feedback this way; the
exact-inverse rules read their finiteness flag every step and check their updates' singular values by design.

Lab code, not part of the package: it sees every aten operation through torch's private ``torch.utils._python_dispatch``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from tplightning._lightning import pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import mnist
from benchmarks.common import RESULTS, machine, quiet, scratch_run, write_block

__all__ = ["HostReads", "count", "main"]

PROG = "python -m benchmarks.syncs"
# aten operations whose result the host must see: on a device each copies a value back and waits for it
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
                      "unique_consecutive", "equal", "allclose"})  # fmt: skip
MASK_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl_"})  # read the device when an index is boolean
HOST_METHODS = ("tolist", "cpu", "numpy")  # Tensor methods that reach the host without an aten operation on a CPU
# frames whose reads touch host tensors only, whatever the device (path fragment: why)
HOST_SIDE = {
    os.path.join("tplightning", "selection.py"): "RandomLayer draws its layer from a CPU generator",
    os.path.join("torch", "optim", ""): "torch's optimizers keep their step counters on the host unless capturable",
}
_OWN_FRAMES = (os.path.join("benchmarks", "syncs.py"), os.path.join("torch", "utils", "_python_dispatch"))
_TORCH = os.path.dirname(torch.__file__) + os.sep


def _short(filename: str) -> str:
    """``package/module.py`` of an installed or a tplightning file, the bare name otherwise."""
    installed, own = "site-packages" + os.sep, "tplightning" + os.sep
    if installed in filename:
        return filename.rsplit(installed, 1)[1]
    if own in filename:
        return own + filename.rsplit(own, 1)[1]
    return Path(filename).name


def _where(stack: list[traceback.FrameSummary]) -> str | None:
    """``file:line`` of the innermost frame outside torch (the code that asked), or ``None`` for a host-side read:
    one whose asking frame, or a torch frame inside it, is in :data:`HOST_SIDE` (the frames further out are not
    looked at: a user's hook that Lightning runs inside an optimizer's step is no optimizer code)."""
    frames = [f for f in stack if not any(own in f.filename for own in _OWN_FRAMES)] or stack
    k = max((i for i, f in enumerate(frames) if not f.filename.startswith(_TORCH)), default=0)
    if any(part in f.filename for f in frames[k:] for part in HOST_SIDE):
        return None
    return f"{_short(frames[k].filename)}:{frames[k].lineno}"


def _count_here(reads: collections.Counter) -> None:
    """Count one read at the code that asked for it (none for a host-side read)."""
    where = _where(traceback.extract_stack())
    if where is not None:
        reads[where] += 1


def _reads_device(func, args, kwargs) -> bool:
    """Whether the aten operation ``func`` makes the host read a device value."""
    name = func._schema.name.split("::")[-1]
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # sizes its output from the repeats unless told
        return (kwargs or {}).get("output_size") is None
    if name in MASK_OPS:  # boolean-mask indexing sizes its result by counting the mask
        indices = args[1] if len(args) > 1 else (kwargs or {}).get("indices", ())
        return any(torch.is_tensor(t) and t.dtype == torch.bool for t in (indices or ()) if t is not None)
    return False


class _ByName(TorchDispatchMode):
    def __init__(self, reads: collections.Counter):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _reads_device(func, args, kwargs):
            _count_here(self.reads)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _reads_by_name(reads: collections.Counter):
    """Count in ``reads`` (by ``file:line``) the host reads made inside the block, on a CPU."""

    def counting(method):
        def wrapper(self, *args, **kwargs):
            _count_here(reads)
            return method(self, *args, **kwargs)

        return wrapper

    saved = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}
    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, counting(method))
        with _ByName(reads):
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@contextlib.contextmanager
def _reads_on_cuda(reads: collections.Counter):
    """Count the synchronizing CUDA operations made inside the block (``torch.cuda.set_sync_debug_mode``)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchroniz" in str(w.message):
            reads[f"{Path(w.filename).name}:{w.lineno}"] += 1


class HostReads(pl.Callback):
    """Counts the host reads of each training batch, from ``on_train_batch_start`` to ``on_train_batch_end``.

    ``per_batch[k]`` maps ``file:line`` (the innermost frame outside torch) to the reads made there in batch ``k``. On
    CUDA the count is torch's own (:func:`torch.cuda.set_sync_debug_mode`). On a CPU it counts the aten operations of
    :data:`SYNC_OPS` (``.item()``, ``bool``/``float``/``int`` of a tensor, ``nonzero``, ``allclose``, ...), boolean-mask
    indexing and ``repeat_interleave`` without ``output_size``, and the methods of :data:`HOST_METHODS`, except those
    asked for by the frames of :data:`HOST_SIDE`; ``.to("cpu")`` is not seen there.
    A rule whose divergence monitor's ``defer`` is ``None`` gets it deferred, as on an accelerator (on a CPU it reads its flag
    at once, which costs nothing there). Checks inside torch's kernels (``torch.linalg``'s error checks, which the
    exact-inverse rules' updates pass through) are seen on CUDA only. The window opens at this callback's
    ``on_train_batch_start`` and closes at its ``on_train_batch_end``: appended last to the trainer's callbacks it
    spans the rule's step and every callback's batch-end hook, not the batch-start hooks of the callbacks before it.
    """

    def __init__(self):
        self.per_batch: list[collections.Counter] = []
        self._block = None

    def on_train_start(self, trainer, pl_module):
        monitor = getattr(pl_module, "divergence", None)
        self._deferred = monitor is not None and monitor.defer is None  # "deferred on accelerators only"
        if self._deferred:
            monitor.defer = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.per_batch.append(collections.Counter())
        on_cuda = pl_module.device.type == "cuda"
        self._block = (_reads_on_cuda if on_cuda else _reads_by_name)(self.per_batch[-1])
        self._block.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._close()

    def on_train_end(self, trainer, pl_module):
        self._close()  # a batch that raised
        if getattr(self, "_deferred", False):
            pl_module.divergence.defer = None  # the rule's own setting again
            self._deferred = False

    def on_exception(self, trainer, pl_module, exception):
        self.on_train_end(trainer, pl_module)

    def _close(self):
        if self._block is not None:
            block, self._block = self._block, None
            block.__exit__(None, None, None)


def count(config: str, device: torch.device, batches: int, log_every: int) -> dict:
    """``train.py --config config`` for ``batches`` training batches (no validation), logging every ``log_every``:
    the host reads per batch, split into the batches that log and the others, and where they were made."""
    from tplightning.cli import build

    reads = HostReads()
    with scratch_run():
        cli = build(["--config", config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(batches),
                     "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", str(log_every),
                     "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu"])  # fmt: skip
        cli.trainer.callbacks.append(reads)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logging = [(k + 1) % log_every == 0 for k in range(len(reads.per_batch))]
    where = collections.Counter()
    for c in reads.per_batch:
        where.update(c)
    return {
        "config": config,
        "batches": len(reads.per_batch),
        "plain": [sum(c.values()) for c, log in zip(reads.per_batch, logging) if not log],
        "logging": [sum(c.values()) for c, log in zip(reads.per_batch, logging) if log],
        "where": dict(where),
    }


def table(results: list[dict], device: torch.device, args) -> str:
    how = ("torch.cuda.set_sync_debug_mode" if device.type == "cuda" else
           "on a CPU by name: the aten operations that read a device value on the host, and `tolist`/`cpu`/`numpy`; "
           "the finiteness check deferred as on an accelerator")  # fmt: skip
    rows = [
        f"### Host reads per training batch ({device.type})",
        "",
        f"Each MNIST config through `train.py` for {args.batches} training batches, logging every {args.log_every}; a "
        f"host read is an operation that makes the host wait for the device ({how}). Reads in torch's optimizers "
        "(step counters on the host) and in `RandomLayer`'s draw (a CPU generator) are host-side on every device and "
        "not counted.",
        "",
        "| rule | config | reads per batch (no logging) | reads per logging batch | where (all batches) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results:
        where = ", ".join(f"`{k}` ×{v}" for k, v in sorted(r["where"].items())) or "–"
        rows.append(f"| {name} | `{r['config']}` | {max(r['plain'], default=0)} | {max(r['logging'], default=0)} | {where} |")
    rows += ["", f"Command: `{command(args)}`", "", f"Machine: {machine(device, threads=False)}."]
    return "\n".join(rows)


def command(args) -> str:
    parts = [PROG, "--batches", str(args.batches), "--log-every", str(args.log_every)]
    if args.rules:
        parts += ["--rules", *args.rules]
    return " ".join(parts)


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rules", nargs="+", default=None, choices=list(mnist.RULES), metavar="RULE",
                   help=f"MNIST rows to run (default: all of {', '.join(mnist.RULES)})")
    p.add_argument("--batches", type=int, default=10, help="training batches per config")
    p.add_argument("--log-every", type=int, default=5, help="log_every_n_steps: the batches that read the step's flags")
    p.add_argument("--out", type=Path, default=RESULTS, help="Markdown file (default: %(default)s)")
    args = p.parse_args(argv)
    if not 1 <= args.log_every <= args.batches:
        p.error(f"--log-every must be in [1, --batches], got --log-every {args.log_every} with --batches {args.batches}")
    return args


def main(argv: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    args = parse_args(argv)
    quiet()
    device = torch.device(args.device)
    results = []
    for name in args.rules or mnist.RULES:
        r = count(mnist.RULES[name].config, device, args.batches, args.log_every)
        print(f"{name:12s} reads per batch {r['plain']}, per logging batch {r['logging']} {r['where'] or ''}", flush=True)
        results.append((name, r))
    write_block(args.out, f"syncs:{device.type}", table(results, device, args))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
