"""Speed of a training step, every rule against BP measured in the same process.

``python -m benchmarks.speed`` measures, for each rule,

* (a) the MNIST network 784-256x5-10 (tanh, cross-entropy, batch 128 or ``--batch``, synthetic inputs of
  MNIST's shape): the median time per training batch with Lightning's loop included, and the
  rule's own ``training_step`` alone (forward, targets, forward and feedback updates);
* (b) square networks n-n-n-n of width n in {256, 512, 1024, 2048} for the exact-inverse rules at
  batch 1 (Sherman-Morrison) and batch 32 (Woodbury), against BP at the same size and against
  re-inverting every ``W`` each step (O(n^3)); a log-log fit gives the scaling exponent of the
  step time in n;
* (c) the small CNN of ``mnist/cnn_bp.yaml`` (BP, LeeDTP, OriginalDTP, DTP-AI), paired with BP as in (a);
* (d) memory: the peak GPU allocation on CUDA; on CPU the bytes of the rule's state
  (parameters, buffers, optimizer state);
* (e) ``--part trainer``: what a user runs. Each MNIST config (BP, FA, DFA, DTP-AI, RDTP-AI, LeeDTP, OriginalDTP,
  AO-SDTP) through ``train.py``'s CLI with its loggers, progress bar, validation and checkpoints, at one thread per
  core and at one thread, next to a plain PyTorch loop of BP's network and optimizer (:func:`plain_run`): time
  per batch from batch ``--skip`` on (start-up cancels), an epoch's time, the validation tail, the ratios to the
  plain loop and to BP (paired runs, median over rounds), and the peak memory of each rule in a fresh process.
  The floating-point operations of one training batch (``torch.utils.flop_counter``: matrix products, counted on the
  batch before the clock starts) give each rule's arithmetic against BP's: the part of its time ratio that is the
  rule's own work rather than overhead (the plain loop's count equals BP's, the check that both do the same work).
  ``--busy`` keeps one core busy with a spinning process meanwhile; ``--quick`` is the smoke test's size.
  Default size: estimated at 6 minutes on a quiet 2-core machine (its one-thread half took 15 minutes on this
  shared machine at load 9, of which 4 minutes of CPU time).

Each figure is printed as a ratio to BP; in (a) every rule is timed right after a BP run and the
ratio is the median over rounds of these paired ratios (:func:`paired_with_bp`), because a shared
host's speed drifts. The tables are written into docs/RESULTS.md
between ``<!-- speed:...:start/end -->`` markers, with the machine they ran on.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tplightning._lightning import pl
import torch

import tplightning as tp
from tplightning.data.base import TensorData, TensorDataModule

from benchmarks import common, mnist
from benchmarks.common import RESULTS, config_value, machine, quiet, scratch_run, write_block

PROG = "python -m benchmarks.speed"
MNIST_RULES = ["BP", "FA", "DFA", "BDFA", "TPAI", "RTPAI", "DTPAI", "RDTPAI", "OriginalTP", "OriginalRTP", "OriginalDTP",
               "OriginalRDTP", "LeeDTP", "AOSDTP", "DDTPLinear", "DRL", "LDRL", "MTP", "FWDTP", "CCL"]  # fmt: skip
EXACT_RULES = ["BP", "TPEI", "RTPEI", "RMTPEI", "TPEIReinvert"]
CNN_RULES = ["BP", "LeeDTP", "OriginalDTP", "DTPAI"]
CNN_CONFIG = "mnist/cnn_bp.yaml"  # the network of the CNN configs


class ReinvertingInverse(tp.target_maps.ExactInverse):
    """An exact-inverse map that recomputes ``W^{-1}`` from scratch after every update: the O(n^3) baseline."""

    @torch.no_grad()
    def rank_update(self, U, V):
        self.upper.weight.add_(U @ V.T)
        self.W_inv.copy_(torch.linalg.inv(self.upper.weight))


class TPEIReinvert(tp.TPEI):
    """TP-EI on :class:`ReinvertingInverse` maps."""

    def make_maps(self):
        return [ReinvertingInverse(m.threshold, m.tau_init, m.inverse_tolerance) for m in super().make_maps()]


class SyntheticData(TensorDataModule):
    """Random inputs and labels of a given shape: speed does not depend on the values."""

    def __init__(self, input_dim: int, output_dim: int, n: int, batch_size: int, task: str):
        super().__init__(batch_size=batch_size, eval_batch_size=batch_size)
        self.input_dim, self.output_dim, self.task, self.n = input_dim, output_dim, task, n

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, self.input_dim, generator=g)
        y = torch.randint(self.output_dim, (self.n,), generator=g) if self.task == "classification" else torch.randn(self.n, self.output_dim, generator=g)
        self.train_data = self.val_data = self.test_data = TensorData(x, y)


class StepTimer(pl.Callback):
    """Wall time of each batch (loop included) and of ``training_step`` alone."""

    def __init__(self, device):
        self.device, self.batch, self.step, self._t0, self._last = device, [], [], 0.0, None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync()
        now = time.perf_counter()
        if self._last is not None:
            self.batch.append(now - self._last)
        self._last = self._t0 = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync()
        self.step.append(time.perf_counter() - self._t0)


def build(name: str, sizes: list[int], classification: bool, network: list[dict] | None = None, **kw):
    """The rule ``name`` on the MLP of ``sizes``, or on ``network`` (layer specs) when given."""
    cls = TPEIReinvert if name == "TPEIReinvert" else getattr(tp, name)
    # orthogonal initial weights, as the MNIST configs: square Gaussian layers are ill-conditioned (their inverses blow
    # the targets up), and Gaussian matrices of large n rarely pass the exact rules' tau_init = 0.4 (section 4.2.3)
    args = dict(init="orthogonal", forward_optimizer=functools.partial(torch.optim.SGD, lr=1e-4), lr_final_factor=1.0, **kw)
    args.update(network=network) if network is not None else args.update(sizes=sizes)
    if classification:  # MTP divides by D = tanh', unbounded when tanh saturates: leaky-ReLU for it
        args.update(activation="leaky_relu" if name == "MTP" else "tanh", loss="cross_entropy")
    if issubclass(cls, (tp.LearnedInverseRule, tp.BDFA, tp.CCL)):
        args["feedback_optimizer"] = functools.partial(torch.optim.SGD, lr=1e-4)
    return cls(**args)


def state_bytes(rule, trainer) -> int:
    n = sum(t.numel() * t.element_size() for t in list(rule.parameters()) + list(rule.buffers()))
    for opt in trainer.optimizers:
        n += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return n


def measure(name: str, sizes: list[int], batch: int, steps: int, warmup: int, device: torch.device, classification: bool,
            network: list[dict] | None = None) -> dict:
    """Median seconds per batch (loop included) and per ``training_step``, and memory."""
    pl.seed_everything(0, verbose=False)
    rule = build(name, sizes, classification, network)
    dm = SyntheticData(sizes[0], sizes[-1], batch * (steps + warmup), batch, "classification" if classification else "regression")
    timer = StepTimer(device)
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=steps + warmup, limit_val_batches=0, accelerator=device.type, devices=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], log_every_n_steps=10**9,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        trainer.fit(rule, datamodule=dm)
    except tp.DivergenceError:  # reported as such; the steps before it were timed
        if len(timer.step) <= warmup + 1:
            return {"rule": name, "sizes": sizes, "batch": batch, "batch_s": math.nan, "step_s": math.nan, "memory": 0}
        warmup = min(warmup, len(timer.step) // 2)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else state_bytes(rule, trainer)
    return {
        "rule": name, "sizes": sizes, "batch": batch,
        "batch_s": statistics.median(timer.batch[warmup:]), "step_s": statistics.median(timer.step[warmup:]),
        "steps": len(timer.step) - warmup,
        "memory": memory,
    }  # fmt: skip


def best_of(repeats: int, runs: list[tuple[str, list[int], int]], args, device, classification: bool) -> list[dict]:
    """Every run ``repeats`` times, interleaved; each keeps its fastest median (the least disturbed)."""
    best: dict[int, dict] = {}
    for round_ in range(repeats):
        for k, (name, sizes, batch) in enumerate(runs):
            r = measure(name, sizes, batch, args.steps, args.warmup, device, classification)
            if k not in best or r["step_s"] < best[k]["step_s"]:
                best[k] = r
            print(f"round {round_} {name:14s} sizes {sizes[0]}x{len(sizes) - 1} batch {batch:3d}: "
                  f"{_ms(r['batch_s'])} ms/batch, {_ms(r['step_s'])} ms/step", flush=True)  # fmt: skip
    return [best[k] for k in range(len(runs))]


def paired_with_bp(repeats: int, names: list[str], sizes: list[int], batch: int, args, device, network: list[dict] | None = None) -> list[dict]:
    """Each rule timed right after a BP run, ``repeats`` rounds; ratios are medians of the paired ratios.

    The machine's speed drifts by 20 % and more over a minute on a shared host, so a ratio of two
    figures taken minutes apart (or each rule's luckiest round against BP's) mostly measures the
    drift. Here every round times BP and then the rule back to back; the figure kept for a rule is
    the median over rounds of its ``step / BP step`` (and ``batch / BP batch``), and its ms are
    medians over rounds too. BP's own row is the median of all its runs.
    """
    bp_runs: list[dict] = []
    rows = {}
    for round_ in range(repeats):
        for name in names:
            bp = measure("BP", sizes, batch, args.steps, args.warmup, device, True, network)
            r = measure(name, sizes, batch, args.steps, args.warmup, device, True, network) if name != "BP" else bp
            bp_runs.append(bp)
            rows.setdefault(name, []).append((r, r["step_s"] / bp["step_s"], r["batch_s"] / bp["batch_s"]))
            print(f"round {round_} {name:14s} {_ms(r['step_s'])} ms/step, BP just before {_ms(bp['step_s'])} ms/step: "
                  f"{r['step_s'] / bp['step_s']:.2f}x", flush=True)  # fmt: skip
    out = []
    for name in names:
        runs = [r for r, _, _ in rows[name]] if name != "BP" else bp_runs
        nan = any(math.isnan(r["step_s"]) for r in runs)
        med = (lambda key: math.nan if nan else statistics.median(r[key] for r in runs))
        ratios = [(a, b) for _, a, b in rows[name]]
        out.append({
            **runs[0], "step_s": med("step_s"), "batch_s": med("batch_s"), "steps": min(r.get("steps", 0) for r in runs),
            "ratio_step": 1.0 if name == "BP" else statistics.median(a for a, _ in ratios),
            "ratio_batch": 1.0 if name == "BP" else statistics.median(b for _, b in ratios),
        })  # fmt: skip
    return out


def exponent(ns: Sequence[int], times: Sequence[float]) -> float:
    """Least-squares slope of log(time) against log(n)."""
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g}"


def _label(r: dict, steps: int) -> str:
    if math.isnan(r["step_s"]):
        return f"{r['rule']} (diverged before timing)"
    return r["rule"] if r.get("steps", steps) >= steps else f"{r['rule']} (diverged; {r['steps']} steps timed)"


def mnist_table(results: list[dict], device, steps: int) -> str:
    bp = next(r for r in results if r["rule"] == "BP")
    mem = "peak GPU memory (MB)" if device.type == "cuda" else "state memory (MB)"
    rows = [f"| rule | ms/batch (loop) | × BP | ms/step (rule alone) | × BP | {mem} |", "|---|---|---|---|---|---|"]
    for r in results:
        ratio_batch, ratio_step = r.get("ratio_batch", r["batch_s"] / bp["batch_s"]), r.get("ratio_step", r["step_s"] / bp["step_s"])
        rows.append(
            f"| {_label(r, steps)} | {_ms(r['batch_s'])} | {ratio_batch:.2f} | {_ms(r['step_s'])} | "
            f"{ratio_step:.2f} | {r['memory'] / 2**20:.1f} |"
        )
    return "\n".join(rows)


def exact_table(results: list[dict], widths: list[int], batches: list[int]) -> str:
    lines = []
    for b in batches:
        lines += [f"\nBatch size {b} ({'Sherman-Morrison' if b == 1 else 'Woodbury'}); ms per `training_step`, × BP at the same width:\n",
                  "| rule | " + " | ".join(f"n = {n}" for n in widths) + " | exponent |", "|---|" + "---|" * (len(widths) + 1)]  # fmt: skip
        bp = {r["sizes"][0]: r["step_s"] for r in results if r["rule"] == "BP" and r["batch"] == b}
        for name in EXACT_RULES:
            rs = sorted((r for r in results if r["rule"] == name and r["batch"] == b), key=lambda r: r["sizes"][0])
            if not rs:
                continue
            cells = [f"{_ms(r['step_s'])} ({r['step_s'] / bp[r['sizes'][0]]:.2f}×)" for r in rs]
            fit = [r for r in rs if r["sizes"][0] >= 512] or rs
            slope = exponent([r["sizes"][0] for r in fit], [r["step_s"] for r in fit]) if len(fit) > 1 else float("nan")
            label = "TP-EI, re-inverting W each step" if name == "TPEIReinvert" else name
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {slope:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- (e) epochs through train.py
#: the MNIST configs the trainer part runs through train.py's CLI, BP first: every rule of the MNIST benchmark on the
#: fully connected network of table 3.1 (the comparators included)
TRAINER_CONFIGS = {r.name: r.config for r in mnist.RULES.values() if r.name not in mnist.CNN}
PLAIN = "plain PyTorch loop"
_DATA: dict = {}  # data modules set up once per process (their loading is start-up, which is not measured)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak memory growth over a stretch of code: GPU bytes allocated on CUDA, else the peak resident set (Linux:
    ``/proc/self/clear_refs`` resets the high-water mark, so the figure is this stretch's own; NaN elsewhere)."""

    def __init__(self, device: torch.device):
        self.device, self.base = device, math.nan

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _proc_kib("VmRSS") * 1024
        except (OSError, AttributeError):
            self.base = math.nan

    def peak(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _proc_kib("VmHWM") * 1024 - self.base if not math.isnan(self.base) else math.nan


class EpochTimer(pl.Callback):
    """Seconds of the training batches from batch ``skip`` on (start-up excluded) and of the epoch's tail, and the
    floating-point operations of batch ``skip - 1`` (before the clock starts: counting slows the batch).

    The clock starts when batch ``skip`` starts and stops when the training batches are done (validation starts,
    or the epoch ends); the tail runs from there to the end of the epoch: validation and the checkpoints written
    after it. On a GPU the clock synchronises at these points only, never per batch. With ``memory`` the peak
    memory growth from the start of training to the end of the epoch is recorded too.
    """

    def __init__(self, device: torch.device, skip: int, memory: bool = False):
        self.device, self.skip, self.batches = device, skip, 0
        self.t0 = self.t_train = self.t_end = None
        self.memory = PeakMemory(device) if memory else None
        self.peak = self.flops = math.nan
        self._counter = None

    def on_train_start(self, trainer, pl_module):
        if self.memory is not None:
            self.memory.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches = batch_idx + 1
        if batch_idx == self.skip - 1:
            self._counter = flop_counter().__enter__()
        if batch_idx == self.skip:
            self.t0 = _sync(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None

    def _training_done(self):
        if self.t_train is None:
            self.t_train = _sync(self.device)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._training_done()

    def on_train_epoch_end(self, trainer, pl_module):
        self._training_done()
        self.t_end = _sync(self.device)
        if self.memory is not None:
            self.peak = self.memory.peak()


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` that prints nothing: ``with flop_counter() as c: ...``, then
    ``c.get_total_flops()`` (matrix products and convolutions, ``2 m n k`` for an ``(m, k) @ (k, n)`` product)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def _shared_data(dm):
    """Give ``dm`` the tensors of an identical data module set up earlier in this process (or set it up now)."""
    key = (type(dm).__name__, repr(sorted(dict(getattr(dm, "hparams", {})).items())))
    if key not in _DATA:
        dm.setup("fit")
        _DATA[key] = dm
    src = _DATA[key]
    dm.train_data, dm.val_data, dm.test_data = src.train_data, src.val_data, src.test_data
    return dm


def _epoch_figures(t0: float, t_train: float, t_end: float, timed_batches: int, batches_per_epoch: int) -> dict:
    """Seconds per batch, per epoch (``batches_per_epoch`` of them) and of the epoch's tail from three clock readings."""
    batch_s = (t_train - t0) / timed_batches
    return {"batch_s": batch_s, "epoch_s": batch_s * batches_per_epoch, "tail_s": t_end - t_train, "per_epoch": batches_per_epoch}


def trainer_run(config: str, threads: int, batches: int, skip: int, device: torch.device, memory: bool = False,
                extra: Sequence[str] = ()) -> dict:
    """One ``train.py --config config --threads threads`` fit of one epoch cut to ``batches`` training batches, with
    the config's full validation pass, loggers, progress bar and checkpoints (in a temporary folder); ``extra``: more
    ``train.py`` options (an A/B of a setting)."""
    from tplightning.cli import build

    timer = EpochTimer(device, skip, memory)
    with scratch_run():
        cli = build(["--config", config, "--threads", str(threads), "--trainer.max_epochs", "1",
                     "--trainer.limit_train_batches", str(batches), "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu", *extra])  # fmt: skip
        cli.trainer.callbacks.append(timer)
        dm = _shared_data(cli.datamodule)
        cli.trainer.fit(cli.model, datamodule=dm)
        per_epoch = len(dm.train_dataloader())
    return {**_epoch_figures(timer.t0, timer.t_train, timer.t_end, timer.batches - skip, per_epoch), "memory": timer.peak,
            "flops": timer.flops}


def plain_run(config: str, threads: int, batches: int, skip: int, device: torch.device, memory: bool = False) -> dict:
    """The reference: the network and forward optimizer of ``config`` (BP's) trained by a plain PyTorch loop.

    ``torch.nn.Linear`` layers (biases as the config) with the config's activation and initial weights, the same
    optimizer class and arguments, cross-entropy, the same batch size and data tensors (shuffled by one
    ``randperm``, batches moved to ``device`` as Lightning does); then a validation pass over the validation set
    in batches of the data module's evaluation size (loss and accuracy, as a user would). Nothing of tplightning
    or Lightning runs in the loop. The floating-point operations of batch ``skip - 1`` are counted.
    """
    torch.set_num_threads(threads)
    data = config_value(config, (), "data")
    module, name = data["class_path"].rsplit(".", 1)
    dm = _shared_data(getattr(importlib.import_module(module), name)(**data.get("init_args", {})))
    init = config_value(config, (), "model.init_args")
    sizes, activation = init["sizes"], init.get("activation", "leaky_relu")
    if activation not in ("tanh", "leaky_relu"):
        raise ValueError(f"plain_run builds tanh or leaky_relu networks, {config} has activation {activation!r}")
    act = torch.nn.Tanh if activation == "tanh" else functools.partial(torch.nn.LeakyReLU, init.get("negative_slope", 0.35))
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = torch.nn.Linear(n_in, n_out, bias=init.get("bias", False))
        if init.get("init", "gaussian") == "orthogonal":
            torch.nn.init.orthogonal_(linear.weight)
        else:  # the layers' gaussian init: std 1/sqrt(fan_in)
            torch.nn.init.normal_(linear.weight, std=n_in**-0.5)
        layers += [linear] + ([act()] if k < len(sizes) - 2 else [])
    net = torch.nn.Sequential(*layers).to(device)
    opt_spec = init["forward_optimizer"]
    module, name = opt_spec["class_path"].rsplit(".", 1)
    opt = getattr(importlib.import_module(module), name)(net.parameters(), **opt_spec.get("init_args", {}))
    x_all, y_all, bs = dm.train_data.x, dm.train_data.y, dm.batch_size
    order = torch.randperm(len(x_all))
    mem = PeakMemory(device)
    if memory:
        mem.start()
    flops = math.nan
    for k in range(batches):
        if k == skip:
            t0 = _sync(device)
        counter = flop_counter() if k == skip - 1 else contextlib.nullcontext()
        with counter:
            idx = order[k * bs : (k + 1) * bs]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if k == skip - 1:
            flops = counter.get_total_flops()
    t_train = _sync(device)
    with torch.no_grad():
        xv, yv, eb = dm.val_data.x, dm.val_data.y, dm.eval_batch_size
        parts = [(net(xv[i : i + eb].to(device)), yv[i : i + eb].to(device)) for i in range(0, len(xv), eb)]
        val_loss = sum(torch.nn.functional.cross_entropy(o, t, reduction="sum") for o, t in parts) / len(xv)
        val_acc = sum((o.argmax(1) == t).sum() for o, t in parts) / len(xv)
        float(val_loss), float(val_acc)  # the user reads them: one sync per epoch
    t_end = _sync(device)
    per_epoch = math.ceil(len(x_all) / bs)
    return {**_epoch_figures(t0, t_train, t_end, batches - skip, per_epoch), "memory": mem.peak() if memory else math.nan,
            "flops": flops}


def _memory_task(task: tuple) -> float:
    """Peak memory of one short run in a fresh process (module level: a spawn pool runs it)."""
    name, config, threads, batches, skip, device = task
    quiet()
    run = plain_run if name == PLAIN else trainer_run
    return run(config, threads, batches, skip, torch.device(device), memory=True)["memory"]


#: the spinning process of ``--busy``: it spins while the process that started it (``argv[1]``) is its parent, for
#: at most ``argv[2]`` seconds, so it ends by itself even when the benchmark is killed and cannot stop it
_SPIN = """import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while os.getppid() == parent and time.monotonic() < end:
    for _ in range(100_000):
        pass
"""
#: the spinner's longest life in seconds: far longer than a ``--part trainer --busy`` run, a bound if all else fails
BUSY_LIMIT_S = 6 * 3600.0


@contextlib.contextmanager
def one_core_busy(enabled: bool, limit_s: float = BUSY_LIMIT_S):
    """A second process spinning in a Python loop for the duration (the load another user's job puts on a core);
    yields it (``None`` when not ``enabled``). It is stopped on leaving, and ends by itself when this process dies
    or after ``limit_s`` seconds."""
    if not enabled:
        yield None
        return
    import subprocess

    spinner = subprocess.Popen([sys.executable, "-c", _SPIN, str(os.getpid()), str(limit_s)])
    try:
        time.sleep(0.5)
        yield spinner
    finally:
        spinner.kill()
        spinner.wait()


def trainer_part(args, device: torch.device) -> dict[int, list[dict]]:
    """Every entry (the plain loop, BP, the rules) at every thread count, ``args.repeats`` rounds.

    Each rule's run comes right after a plain-loop run at the same thread count: its ``× plain`` is the median over
    rounds of these paired ratios, and its ``× BP`` the median over rounds of ``(rule / its plain run) / (BP / BP's
    plain run)``. The order of the rules alternates between rounds. Times are medians over rounds.
    """
    names = ["BP"] + [r for r in (args.rules or TRAINER_CONFIGS) if r != "BP"]
    bp_config = TRAINER_CONFIGS["BP"]
    n, skip = args.trainer_batches, args.skip
    runs: dict[int, dict[str, list[tuple[dict, dict]]]] = {th: {name: [] for name in names} for th in args.trainer_threads}
    with one_core_busy(args.busy):
        for round_ in range(args.repeats):
            for th in args.trainer_threads:
                for name in names if round_ % 2 == 0 else names[::-1]:
                    plain = plain_run(bp_config, th, n, skip, device)
                    r = trainer_run(TRAINER_CONFIGS[name], th, n, skip, device)
                    runs[th][name].append((plain, r))
                    print(f"round {round_} threads {th} {name:12s} {_ms(r['batch_s'])} ms/batch, plain loop just before "
                          f"{_ms(plain['batch_s'])}: {r['batch_s'] / plain['batch_s']:.2f}x", flush=True)  # fmt: skip
    memory = {}
    if args.memory:  # each in a fresh process, so that no run inherits another's allocations
        tasks = [(name, TRAINER_CONFIGS.get(name, bp_config), 1, min(n, skip + 10), skip, str(device)) for name in [PLAIN, *names]]
        with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            memory = dict(zip([PLAIN, *names], pool.map(_memory_task, tasks, chunksize=1)))
    out: dict[int, list[dict]] = {}
    for th, per_rule in runs.items():
        med = statistics.median
        bp_rounds = per_rule["BP"]
        plains = [p for pairs in per_rule.values() for p, _ in pairs]
        bp_flops = bp_rounds[0][1]["flops"]
        rows = [{"rule": PLAIN, "threads": th, "batch_s": med([p["batch_s"] for p in plains]), "ratio_plain": 1.0,
                 "flops": plains[0]["flops"], "ratio_flops": plains[0]["flops"] / bp_flops,
                 "ratio_bp": med([p["batch_s"] / r["batch_s"] for p, r in bp_rounds]), "epoch_s": med([p["epoch_s"] for p in plains]),
                 "tail_s": med([p["tail_s"] for p in plains]), "memory": memory.get(PLAIN, math.nan), "per_epoch": plains[0]["per_epoch"]}]  # fmt: skip
        for name, pairs in per_rule.items():
            rows.append({
                "rule": name, "threads": th, "batch_s": med([r["batch_s"] for _, r in pairs]),
                "flops": pairs[0][1]["flops"], "ratio_flops": pairs[0][1]["flops"] / bp_flops,
                "ratio_plain": med([r["batch_s"] / p["batch_s"] for p, r in pairs]),
                "ratio_bp": med([(r["batch_s"] / p["batch_s"]) / (b["batch_s"] / q["batch_s"]) for (p, r), (q, b) in zip(pairs, bp_rounds)]),
                "epoch_s": med([r["epoch_s"] for _, r in pairs]), "tail_s": med([r["tail_s"] for _, r in pairs]),
                "memory": memory.get(name, math.nan), "per_epoch": pairs[0][1]["per_epoch"],
            })  # fmt: skip
        out[th] = rows
    return out


#: labels of the trainer table (the rules' names elsewhere)
LABELS = {"DTPAI": "DTP-AI", "RDTPAI": "RDTP-AI", "AOSDTP": "AO-SDTP", "DDTPLinear": "DDTP-linear", "LDRL": "L-DRL", "FWDTP": "FW-DTP"}
#: the trainer part's measurements, one record per block (``common``'s "Run records"), from which its tables are rendered
TRAINER_RECORD = "speed_trainer.jsonl"
TRAINER_KIND = common.Kind("speed-trainer", {"block": "str", "command": "str", "machine": "str", "trainer_batches": "int", "skip": "int",
                                             "repeats": "int", "busy": "bool", "device": "str", "results": "object"}, key=("block",))  # fmt: skip


def mnist_timing(out: Path) -> dict[str, tuple[str, str]]:
    """Per rule of the MNIST table beside ``out``: its recorded seconds per epoch (mean ± sd over seeds) and its time to
    98 % validation accuracy (``benchmarks.mnist``'s time-to-accuracy table: censored median over seeds, × BP)."""
    records = mnist.read_records(out)
    rows = mnist.time_to_accuracy(records)
    bp = next((r for r in rows if r["rule"] == "BP"), None)
    return {r["rule"]: (mnist._fmt(r["seconds_per_epoch"], 1), mnist._tta_cell(r["thresholds"][0.98], bp["thresholds"][0.98] if bp else None).split(" · ")[0])
            for r in rows}  # fmt: skip


def trainer_table(results: dict[int, list[dict]], device: torch.device, timing: dict[str, tuple[str, str]] | None = None) -> str:
    """The trainer part's table; ``timing``: the MNIST records' seconds per epoch and time to 98 % per rule
    (:func:`mnist_timing`), two columns beside the measured epoch."""
    threads = list(results)
    timing = timing or {}
    mem = "peak GPU memory growth (MB)" if device.type == "cuda" else "peak RSS growth (MB)"
    head = ("| rule | GFLOP/batch | FLOPs × BP | " + " | ".join(f"{th} thr: ms/batch | × plain | × BP | epoch s | + validation s"
                                                             for th in threads) + f" | {mem} | MNIST records: s/epoch | MNIST records: to 98 % |")  # fmt: skip
    rows = [head, "|---|" + "---|" * (5 * len(threads) + 5)]
    for k, r0 in enumerate(results[threads[0]]):
        cells = []
        for th in threads:
            r = results[th][k]
            cells.append(f"{_ms(r['batch_s'])} | {r['ratio_plain']:.2f} | {r['ratio_bp']:.2f} | {r['epoch_s']:.1f} | {r['tail_s']:.2f}")
        label = LABELS.get(r0["rule"], r0["rule"])
        memory = "–" if r0["memory"] is None or math.isnan(r0["memory"]) else f"{r0['memory'] / 2**20:.0f}"  # --no-memory
        spe, tta = timing.get(r0["rule"], ("–", "–"))
        rows.append(f"| {label} | {r0['flops'] / 1e9:.3f} | {r0['ratio_flops']:.2f} | " + " | ".join(cells) + f" | {memory} | {spe} | {tta} |")
    return "\n".join(rows)


def trainer_command(args) -> str:
    parts = [PROG, "--part", "trainer", "--trainer-batches", str(args.trainer_batches), "--skip", str(args.skip),
             "--repeats", str(args.repeats), "--trainer-threads", *map(str, args.trainer_threads)]  # fmt: skip
    if args.rules:
        parts += ["--rules", *args.rules]
    if args.busy:
        parts.append("--busy")
    if not args.memory:
        parts.append("--no-memory")
    return " ".join(parts)


def render_trainer(rec: dict, out: Path) -> str:
    """The trainer block of the record ``rec`` (:data:`TRAINER_KIND`), with the MNIST records beside ``out``."""
    results = {int(th): [{**r, "memory": math.nan if r["memory"] is None else r["memory"]} for r in rows] for th, rows in rec["results"].items()}
    device = torch.device(rec["device"])
    busy = " with one core busy" if rec["busy"] else ""
    per_epoch = results[next(iter(results))][0]["per_epoch"]
    return (f"### Epochs through train.py{busy} ({'gpu' if device.type == 'cuda' else 'cpu'})\n\nEach rule's MNIST config (`configs/mnist/`) run as `train.py` builds it "
            f"(its loggers, progress bar, checkpoints and validation), one epoch cut to {rec['trainer_batches']} training batches; "
            f"ms/batch is the mean time per batch from batch {rec['skip']} on (start-up excluded), epoch s that times the "
            f"{per_epoch} batches of a full epoch, + validation s the epoch's tail (the full validation pass and "
            f"the checkpoints after it). The plain PyTorch loop is BP's network and optimizer (AdamW) in a loop of a few lines "
            f"(`plain_run`), with a validation pass and no checkpoint. Every rule ran right after a plain-loop run, "
            f"{rec['repeats']} rounds per thread count; × plain is the median of these paired ratios, × BP the median of "
            f"(rule / its plain run) / (BP / BP's plain run); times are medians over rounds. GFLOP/batch: the floating-point "
            f"operations of one training batch (matrix products; `torch.utils.flop_counter`), FLOPs × BP their ratio to BP's: "
            f"the part of × BP that is the rule's arithmetic. Peak memory: growth from the "
            f"start of training over a 10-batch run and its validation, each rule in a fresh process, 1 thread. "
            f"The last two columns are not measured here: they come from the MNIST campaign's records (`docs/data/mnist_table.jsonl`, "
            f"one torch thread, whole runs with validation, checkpoints and the final test, on the machines the MNIST "
            f"table names): the seconds per epoch (mean ± sd over seeds) and the time to 98 % validation accuracy "
            f"(median over seeds and × BP, from the time-to-accuracy table, where its rules are explained).\n\n"
            f"{trainer_table(results, device, mnist_timing(out))}\n\nCommand: `{rec['command']}`\n\nMachine: {rec['machine']}.")  # fmt: skip


def write_trainer_table(args, device, results) -> None:
    tag = "gpu" if device.type == "cuda" else "cpu"
    block = f"speed:trainer{'-busy' if args.busy else ''}:{tag}"
    rec = {"block": block, "command": trainer_command(args), "machine": machine(device, threads=False), "trainer_batches": args.trainer_batches,
           "skip": args.skip, "repeats": args.repeats, "busy": bool(args.busy), "device": str(device),
           "results": {str(th): [{**r, "memory": None if math.isnan(r["memory"]) else r["memory"]} for r in rows] for th, rows in results.items()}}  # fmt: skip
    common.append_record(common.data_file(args.out, TRAINER_RECORD), TRAINER_KIND, rec)
    write_block(args.out, block, render_trainer(rec, args.out))


def rewrite_trainer(out: Path) -> list[str]:
    """Render every recorded trainer block of ``out`` again (after new MNIST records, or a change of layout); returns their names."""
    recs = common.newest(common.read_records(common.data_file(out, TRAINER_RECORD), TRAINER_KIND), key=lambda rec: rec["block"])
    for block, rec in recs.items():
        write_block(out, block, render_trainer(rec, out))
    return list(recs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["mnist", "cnn", "exact", "trainer", "all"], default="all",
                   help="all: the step-time parts (mnist, cnn, exact); trainer: epochs through train.py (run on its own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=30, help="measured steps per rule (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=128, help="batch size of parts mnist and cnn (tables of other sizes get their own block)")
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rules", nargs="+", default=None, help="restrict part (a) to these rules (BP is always measured)")
    p.add_argument("--repeats", type=int, default=None, help="rounds over all rules (default 2; trainer part 3); part (a): paired ratios to BP, "
                   "median over rounds; part (b): each figure is its best round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable ratios on a shared machine)")
    p.add_argument("--out", type=Path, default=RESULTS, help="Markdown file (default: %(default)s)")
    t = p.add_argument_group("trainer part")
    t.add_argument("--trainer-batches", type=int, default=60, help="training batches per run (the epoch is cut there)")
    t.add_argument("--skip", type=int, default=5, help="batches before the clock starts (start-up)")
    t.add_argument("--trainer-threads", type=int, nargs="+", default=sorted({os.cpu_count() or 1, 1}, reverse=True),
                   help="torch CPU threads, one column group each (default: one per core, and 1)")
    t.add_argument("--busy", action="store_true", help="keep one core busy with a spinning process while timing")
    t.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs (a fresh process per rule)")
    p.add_argument("--rewrite", action="store_true", help="run nothing: render the recorded trainer tables again (docs/data/speed_trainer.jsonl)")
    t.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test: BP and DTP-AI, 4 batches, 1 round, 1 thread")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.part == "trainer" else 2
    if args.quick:
        args.rules, args.trainer_batches, args.skip, args.repeats, args.trainer_threads = args.rules or ["DTPAI"], 4, 1, 1, [1]
    if args.part == "trainer":
        unknown = [r for r in args.rules or () if r not in TRAINER_CONFIGS]
        if unknown:
            p.error(f"--rules {' '.join(unknown)}: the trainer part runs the MNIST configs of {', '.join(TRAINER_CONFIGS)}")
        if not 0 < args.skip < args.trainer_batches:
            p.error(f"--skip must be in [1, --trainer-batches), got --skip {args.skip} with --trainer-batches {args.trainer_batches}")
    return args


def _batch_tag(args) -> str:
    return "" if args.batch == 128 else f"-b{args.batch}"


def command(args) -> str:
    parts = [PROG, "--part", args.part, "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    if args.batch != 128:
        parts += ["--batch", str(args.batch)]
    if args.part in ("exact", "all"):
        parts += ["--widths", *map(str, args.widths), "--batches", *map(str, args.batches)]
    if args.rules:
        parts += ["--rules", *args.rules]
    return " ".join(parts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.rewrite:
        blocks = rewrite_trainer(args.out)
        print(f"rewrote {', '.join(blocks) or 'no block'} of {args.out} from {common.data_file(args.out, TRAINER_RECORD)}")
        return {}
    if args.part == "trainer":  # train.py sets its own threads
        threads = torch.get_num_threads()
        try:
            results = trainer_part(args, device)
        finally:
            torch.set_num_threads(threads)
        write_trainer_table(args, device, results)
        return {"trainer": results}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, device) -> dict:
    tag = "gpu" if device.type == "cuda" else "cpu"
    out: dict = {}
    if args.part in ("mnist", "all"):
        rules = ["BP"] + [r for r in (args.rules or MNIST_RULES) if r != "BP"]
        res = paired_with_bp(args.repeats, rules, [784] + [256] * 5 + [10], args.batch, args, device)
        out["mnist"] = res
        body = (f"### Step time on the MNIST network ({tag})\n\n784-256x5-10, tanh (MTP: leaky-ReLU), orthogonal initial weights, SGD lr 1e-4 for forward and feedback weights, the rules' other hyper-parameters at their defaults (original forms: noise injection sigma 1), cross-entropy, batch {args.batch}, median "
                f"of {args.steps} steps after {args.warmup} warm-up steps. Each rule is timed right after a BP run, in {args.repeats} rounds; "
                f"× BP is the median over rounds of these paired ratios (the host's speed drifts), ms are medians over rounds.\n\n{mnist_table(res, device, args.steps)}\n\n"
                f"Command: `{command(args)}`\n\nMachine: {machine(device)}.")  # fmt: skip
        write_block(args.out, f"speed:mnist{_batch_tag(args)}:{tag}", body)
    if args.part in ("cnn", "all"):
        network = config_value(CNN_CONFIG, (), "model.init_args.network")
        res = paired_with_bp(args.repeats, CNN_RULES, [784, 10], args.batch, args, device, network)
        out["cnn"] = res
        layers = ", ".join(f"{spec['class_path'].rsplit('.', 1)[-1]}({', '.join(f'{k} {v}' for k, v in spec['init_args'].items() if k != 'init')})" for spec in network)
        body = (f"### Step time on a small CNN ({tag})\n\nThe network of `configs/{CNN_CONFIG}`: {layers}; orthogonal initial weights, "
                f"SGD lr 1e-4, the rules' defaults otherwise, cross-entropy, batch {args.batch}, median of {args.steps} steps after "
                f"{args.warmup} warm-up steps, paired with BP as above ({args.repeats} rounds).\n\n{mnist_table(res, device, args.steps)}\n\n"
                f"Command: `{command(args)}`\n\nMachine: {machine(device)}.")  # fmt: skip
        write_block(args.out, f"speed:cnn{_batch_tag(args)}:{tag}", body)
    if args.part in ("exact", "all"):
        runs = [(name, [n] * 4, b) for b in args.batches for n in args.widths for name in EXACT_RULES]
        res = best_of(args.repeats, runs, args, device, False)
        out["exact"] = res
        body = (f"### Exact inverses at width ({tag})\n\nSquare networks n-n-n-n, leaky-ReLU, orthogonal initial weights, median of {args.steps} "
                f"steps, best of {args.repeats} rounds. The exponent is the log-log slope of step time against n (fitted on n >= 512).\n"
                f"{exact_table(res, args.widths, args.batches)}\n\nCommand: `{command(args)}`\n\nMachine: {machine(device)}.")  # fmt: skip
        write_block(args.out, f"speed:exact:{tag}", body)
    return out


if __name__ == "__main__":
    main()
