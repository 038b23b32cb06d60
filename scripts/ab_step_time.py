"""Step time of this checkout against another checkout of tplightning (or at two thread counts), interleaved in one process.

    python scripts/ab_step_time.py OTHER_REPO [--steps 200] [RULE ...]
    python scripts/ab_step_time.py --threads 1 2 [--steps 200] [RULE ...]
    python scripts/ab_step_time.py --compile [--device cuda] [--steps 200] [RULE ...]

Loads OTHER_REPO/tplightning under the name ``tpother`` next to this tree's ``tplightning``, builds each rule
in both on the MNIST network of the speed benchmark (784-256x5-10, tanh or --activation, orthogonal, SGD 1e-4, batch 128, one torch
thread) and times their ``training_step`` alternately, step by step, so both see the same machine state. Prints
the medians and the median of the paired ratios this/other: the check a refactor needs ("no rule slower"), which
two benchmark runs minutes apart on a shared host cannot resolve (their ratios drift by 10 % and more).

With ``--threads A B`` (no OTHER_REPO) the same rule of this checkout is timed at A torch threads ("other") and at
B ("this"), step by step: how much a second thread gains, or, on a machine whose other cores are busy, loses (the
case behind ``train.py``'s default of one thread for small networks; run it under ``OMP_WAIT_POLICY=PASSIVE`` to see
what OpenMP's passive waiting changes).

With ``--compile`` the same rule is timed eager ("other") and with its tensor computations compiled by
``torch.compile`` ("this", ``--compile-mode`` as torch.compile's): the network's forward pass, the targets, the local and the feedback gradients (the
optimizer steps and Lightning's calls stay eager; :func:`compile_pieces`). Both start from the same weights and see
the same batches; the largest difference of their weights after the run is printed (rounding, not a different
rule). ``--device cuda`` runs any mode on a GPU (synchronizing around each timed step).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

RULES = ["BP", "TPAI", "RTPAI", "DTPAI", "RDTPAI", "OriginalTP", "OriginalRTP", "OriginalDTP", "OriginalRDTP", "LeeDTP", "AOSDTP", "MTP"]


def load_other(repo: Path):
    init = repo / "tplightning" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"error: {init} not found; OTHER_REPO must be a checkout of tplightning")
    spec = importlib.util.spec_from_file_location("tpother", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tpother"] = module
    spec.loader.exec_module(module)
    return module


def compile_pieces(rule, mode: str = "default") -> None:
    """``torch.compile`` the pure tensor work of ``rule``'s step in place: ``net.forward_all`` and, where the rule has
    them, ``targets_from``, ``forward_grads`` and ``feedback_grads`` (dynamo splits them where they call what it cannot
    trace, such as the noise generator: 5 graphs for DTP-AI, 15 for LeeDTP, none added after the first steps); ``mode``:
    torch.compile's (``reduce-overhead`` replays CUDA graphs on a GPU)."""
    rule.net.forward_all = torch.compile(rule.net.forward_all, mode=mode)
    for piece in ("targets_from", "forward_grads", "feedback_grads"):
        if hasattr(rule, piece):
            setattr(rule, piece, torch.compile(getattr(rule, piece), mode=mode))


def build(tp, name: str, activation: str = "tanh", device: str = "cpu"):
    sgd = functools.partial(torch.optim.SGD, lr=1e-4)
    kw = dict(sizes=[784] + [256] * 5 + [10], init="orthogonal", activation="leaky_relu" if name == "MTP" else activation,
              loss="cross_entropy", forward_optimizer=sgd, lr_final_factor=1.0)  # fmt: skip
    if issubclass(getattr(tp, name), tp.LearnedInverseRule):
        kw["feedback_optimizer"] = sgd
    torch.manual_seed(0)
    rule = getattr(tp, name)(**kw).to(device)
    opts = rule.build_optimizers()
    rule.optimizer_list = lambda: opts  # no Trainer: the step alone
    rule.log_train = lambda *a: None
    rule.manual_backward = lambda loss: loss.backward()
    return rule


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("other", type=Path, nargs="?", help="another checkout (or --threads)")
    p.add_argument("rules", nargs="*", default=RULES)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--activation", default="tanh", help="hidden activation (MTP: always leaky_relu)")
    p.add_argument("--threads", type=int, nargs=2, metavar=("A", "B"), help="compare A threads ('other') with B ('this')")
    p.add_argument("--compile", action="store_true", help="compare eager ('other') with torch.compile ('this')")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile's mode (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_intermixed_args(argv)
    no_checkout = args.threads or args.compile
    if no_checkout and args.other is not None and not args.other.is_dir():  # no checkout in this mode: a rule
        args.rules = [str(args.other)] + (args.rules if args.rules is not RULES else [])
        args.other = None
    if [args.other is not None, args.threads is not None, args.compile].count(True) != 1:
        raise SystemExit("error: give one of OTHER_REPO, --threads A B or --compile")
    threads = args.threads or (1, 1)
    torch.set_num_threads(threads[1])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tplightning as this

    other = load_other(args.other) if args.other is not None else this

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 784, generator=g).to(args.device), torch.randint(0, 10, (128,), generator=g).to(args.device))
               for _ in range(8)]  # fmt: skip
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else lambda: None
    ratios = {}
    for name in args.rules:
        a, b = build(other, name, args.activation, args.device), build(this, name, args.activation, args.device)
        if args.compile:  # each rule compiles afresh: dynamo's per-function recompile limit is not shared between rules
            torch._dynamo.reset()
            compile_pieces(b, args.compile_mode)
        for k in range(10):  # warm-up (and compilation)
            a.training_step(batches[k % 8], k), b.training_step(batches[k % 8], k)
        ta, tb = [], []
        for k in range(args.steps):
            for rule, ts, n in ((a, ta, threads[0]), (b, tb, threads[1])) if k % 2 else ((b, tb, threads[1]), (a, ta, threads[0])):
                torch.set_num_threads(n)
                sync()
                t = time.perf_counter()
                rule.training_step(batches[k % 8], k)
                sync()
                ts.append(time.perf_counter() - t)
        ratios[name] = statistics.median(y / x for x, y in zip(ta, tb))
        a_name, b_name = (f"{threads[0]} thr", f"{threads[1]} thr") if args.threads else ("eager", "compiled") if args.compile else ("other", "this")
        drift = ""
        if args.compile:
            diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
            drift = f"  max |weight difference| {diff:.1e}"
        print(f"{name:12s} {a_name} {statistics.median(ta) * 1e3:7.3f} ms  {b_name} {statistics.median(tb) * 1e3:7.3f} ms  "
              f"{b_name}/{a_name} {ratios[name]:.3f}{drift}", flush=True)  # fmt: skip
    return ratios


if __name__ == "__main__":
    main()
