"""GNT angles on MNIST at Meulemans et al. 2020's protocol (their fig. 4 / S4).

The angle between each hidden layer's weight update and the update the damped Gauss-Newton targets would give
(:func:`tplightning.diagnostics.gnt_angles`), logged every ``--every`` forward batches on ``--max-samples`` rows of the
batch, for:

* ``DTP``: original DTP (:class:`~tplightning.rules.learned.OriginalDTP`), no feedback pre-training (the authors' DTP);
* ``DTP-pretrained``: the same rule with 6 feedback pre-training epochs and one feedback-only epoch after every epoch
  (the authors' "DTP (pre-trained)" / ``config_DTP_improved``);
* ``DRL``: :class:`~tplightning.rules.drl.DRL` (the authors' DTPDRL);
* ``DDTP-linear``: :class:`~tplightning.rules.drl.DDTPLinear` (the authors' DMLPDTP2 with linear feedback);
* ``L-DRL``: :class:`~tplightning.rules.drl.LDRL` at DRL's settings (no MNIST settings from its authors);
* ``DTP-AI``: the thesis' :class:`~tplightning.rules.learned.DTPAI` at DRL's forward settings, its own config's
  feedback settings (``mnist/dtp_ai.yaml``), ``Q`` starting at ``W^dagger``.

The protocol, read from the authors' ``figure_scripts/final_figure_mnist.py`` and ``lib/train.py``: 784-256x5-10, tanh
hidden layers, linear output with cross-entropy, forward and feedback biases, Xavier-normal initial weights, batch 128,
Adam for both weight sets with their searched rates, betas and epsilons, the feedback weight decay as Adam's
``weight_decay``, one feedback update per batch before the forward optimizer's step (``feedback_first``), 6 feedback
pre-training epochs and one feedback-only epoch after every epoch where their config has them, the GNT damping per
method and layer of their figure script. Conversions: their loss is the batch *mean*, so their output target step
``eta`` is ``eta / 128`` in ours (per-sample errors); ``normalize_lr`` divides their forward rate by ``eta``; their
feedback losses average over the layer's units as well, so our feedback gradients are ``n_i / 2 = 128`` times theirs
and their feedback Adam's ``eps`` and weight decay are multiplied by 128 here (:data:`FEEDBACK_SCALE`); their
random feedback weights are Xavier normal (``feedback_init="xavier_normal"``, drawn when the rule is built after
``seed_everything(seed)``) and their feedback maps have biases inside the feedback nonlinearity, starting at 0
(``feedback_bias=True``; DDTP-linear's linear direct map has none here: a bias cancels in its difference target and
its loss, so it would stay at 0). Difference left: float32 training (the angles are computed in float64).

Output: ``gnt_angles.json`` (per rule: the settings, every logged angle with its forward step, and the mean of the
last ``--tail`` logs per layer) and ``gnt_angles.png``; a rule already in the JSON is skipped (``--force`` reruns it),
so an interrupted run resumes after the last finished rule. ``--subset`` trains on the first N training images
(shuffled split), ``--pretrain`` overrides the pre-training epochs, ``--set RULE.key=value`` any rule argument (JSON
value; ``forward_lr``, ``feedback_lr``, ``feedback_eps`` and ``feedback_adam_wd`` replace one optimizer setting alone, ``top_feedback_std`` rescales the top feedback
matrix's draw to that std; ``feedback_init="random"`` and ``feedback_bias=false`` give the library's defaults), ``--search N`` runs the authors' damping search
(:func:`tplightning.diagnostics.damping_search`, their grid) after training on every ``--every``-th of the first
batches, N of them, and stores the chosen dampings, e.g. ``--set DRL.feedback_first=false`` (the
investigation of docs/experiments.md).

    python -m experiments.gnt_angles [--rules DRL,DTP] [--epochs 1] [--subset 10000] [--every 10] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

import tplightning as tp
from tplightning._lightning import pl
from tplightning.diagnostics import DAMPING_GRID, TargetPropDiagnostics, damping_search

from experiments.common import REPO, plot_layer_logs

NAME = "gnt_angles"
BATCH = 128


def _adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
    return functools.partial(torch.optim.Adam, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


#: their feedback losses are means over the layer's units too (``F.mse_loss``): our feedback gradients are ``n_i / 2``
#: times theirs (``n_i = 256``), so Adam's ``eps`` and the weight decay added to the gradient scale by that factor
FEEDBACK_SCALE = 256 / 2


def _authors(lr, eta, betas, eps, lr_fb, betas_fb, eps_fb, sigma, wd_fb=0.0, pretrain=6, extra=1) -> dict:
    """Our arguments for one of the authors' MNIST configs (conversions in the module docstring)."""
    return {
        "forward_optimizer": _adam(lr / eta, betas, eps),  # normalize_lr: True
        "target_stepsize": eta / BATCH,  # their dL/do carries the batch mean's 1/B
        "feedback_optimizer": _adam(lr_fb, betas_fb, eps_fb * FEEDBACK_SCALE, wd_fb * FEEDBACK_SCALE),
        "feedback_noise_std": sigma,
        "feedback_pretrain_epochs": pretrain,
        "feedback_extra_epochs": extra,
    }


#: the authors' searched MNIST settings (figure_scripts/final_figure_mnist.py) and GNT dampings
_DRL = _authors(2.968902530985572e-05, 0.06858850589618244, (0.9, 0.99), 1.001084429920261e-08, 2.0123315498373473e-05, (0.99, 0.999),
                5.0844503288987736e-08, 0.056879454462500055, 5.384963778780523e-06)  # fmt: skip
RULES = {
    "DTP": ("OriginalDTP", _authors(6.185037324617764e-05, 0.21951187497378802, (0.9, 0.999), 1.0170111936290766e-08, 0.0019584756448113774,
                                    (0.9, 0.999), 7.541132645747324e-06, 0.08372453893037193, pretrain=0, extra=0), [10.0, 10.0, 1.0, 1.0, 0.01]),  # fmt: skip
    "DTP-pretrained": ("OriginalDTP", _authors(8.755114977760993e-05, 0.29588215061609174, (0.9, 0.99), 1.3539369588818846e-07, 0.00046353371500045345,
                                               (0.9, 0.9), 4.3671895272055226e-07, 0.17295321576257636, 0.002191969471427704), [10.0, 10.0, 10.0, 1.0, 0.0]),  # fmt: skip
    "DRL": ("DRL", _DRL, [1.0, 1.0, 1.0, 1.0, 0.0]),
    "DDTP-linear": ("DDTPLinear", _authors(2.0354415171962153e-05, 0.06096940412767466, (0.9, 0.999), 1.255238177132068e-08, 0.00016378232822128718,
                                           (0.999, 0.999), 0.0002838378678760835, 0.0907524824699504, 5.836204840235672e-07), [1.0, 1.0, 1.0, 1.0, 1e-4]),  # fmt: skip
    "L-DRL": ("LDRL", {**_DRL, "feedback_iterations": 1}, [1.0, 1.0, 1.0, 1.0, 0.0]),
    "DTP-AI": ("DTPAI", {**{k: v for k, v in _DRL.items() if not k.startswith("feedback")}, "feedback_optimizer": functools.partial(torch.optim.SGD, lr=0.003442),
                         "feedback_noise_std": 0.2171, "feedback_weight_decay": 0.01352, "feedback_init": "pinv", "feedback_iterations": 2},
               [1.0, 1.0, 1.0, 1.0, 0.0]),  # fmt: skip
}
COMMON = {"activation": "tanh", "output_activation": "linear", "loss": "cross_entropy", "bias": True, "init": "xavier_normal", "lr_final_factor": 1.0}


def build(name: str, sizes: Sequence[int], overrides: dict | None = None, seed: int = 0):
    """The rule ``name`` at the protocol (``overrides`` replace arguments): the authors' Xavier-normal random feedback
    and, in the original form ``s_i(Q_i h + d_i)``, their feedback biases."""
    cls_name, kwargs, _ = RULES[name]
    cls = getattr(tp, cls_name)
    args = {**COMMON, "sizes": list(sizes), **kwargs}
    if hasattr(cls, "feedback_first"):  # the DRL family: the authors' feedback-before-forward order, random feedback
        args.update(feedback_first=True, feedback_init="xavier_normal")
    elif cls_name == "OriginalDTP":
        args["feedback_init"] = "xavier_normal"
    if issubclass(cls, tp.OriginalDTP):  # DTP, DRL, L-DRL: g_i(h) = tanh(Q_i h + d_i) as theirs
        args["feedback_bias"] = True
    overrides = dict(overrides or {})
    for key, opt, name in (("forward_lr", "forward_optimizer", "lr"), ("feedback_lr", "feedback_optimizer", "lr"),
                           ("feedback_eps", "feedback_optimizer", "eps"), ("feedback_adam_wd", "feedback_optimizer", "weight_decay")):  # fmt: skip
        if key in overrides:  # one optimizer setting alone
            args[opt] = functools.partial(args[opt].func, *args[opt].args, **{**args[opt].keywords, name: overrides.pop(key)})
    args.update(overrides)
    top_std = args.pop("top_feedback_std", None)
    pl.seed_everything(seed)
    rule = cls(**args)
    if top_std is not None:  # the top feedback map alone rescaled to this std (the same draw)
        with torch.no_grad():
            Q = rule.feedback_weights[-1]
            Q.mul_(top_std / float(Q.std()))
    return rule


def max_epochs(rule, forward_epochs: int) -> int:
    """Epochs for ``forward_epochs`` forward epochs under the rule's schedule (no feedback-only epoch after the last)."""
    e, done = 0, 0
    while done < forward_epochs:
        done += int(rule.trains_forward(e)) if hasattr(rule, "trains_forward") else 1
        e += 1
    return e


def run_rule(name: str, args) -> dict:
    overrides = dict(args.overrides.get(name, {}))
    if args.pretrain is not None and RULES[name][1].get("feedback_pretrain_epochs", 0):
        overrides.setdefault("feedback_pretrain_epochs", args.pretrain)
    dampings = overrides.pop("gnt_damping", None) or RULES[name][2]
    rule = build(name, args.sizes, overrides, args.seed)
    dampings = dampings[len(dampings) - (len(args.sizes) - 2):]  # a shallower network (tests): the top layers' values
    data_dir = os.environ.get("TPLIGHTNING_DATA")
    num_val = 1000 if args.subset else 5000
    dm = tp.MNISTDataModule(data_dir=data_dir, num_train=(args.subset or 60000) - num_val, num_val=num_val, subset=args.subset,
                            batch_size=BATCH, download=False)  # fmt: skip
    diag = TargetPropDiagnostics(every_n_steps=args.every, max_samples=args.max_samples, signals=False, gnt_damping=dampings,
                                 forward_batches_only=True)  # fmt: skip
    trainer = pl.Trainer(max_epochs=max_epochs(rule, args.epochs), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[diag],
                         limit_train_batches=args.limit_batches)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(rule, datamodule=dm)
    seconds = time.perf_counter() - start
    L = len(args.sizes) - 1
    search = {}
    if args.search:  # the authors' damping search, at the end of the run (theirs: after epoch 2), every 80th batch
        batches = [b for k, b in enumerate(dm.train_dataloader()) if k % args.every == 0][: args.search]
        lams, table = damping_search(rule, batches)
        search = {"dampings": lams, "grid": list(DAMPING_GRID), "mean_angles": table.tolist(), "batches": len(batches)}
    logs = [{"forward_step": h["step"], "epoch": h["epoch"], "angles": [h[f"diag/gnt_angle_{i}"] for i in range(1, L)]}
            for h in diag.history if "diag/gnt_angle_1" in h]  # fmt: skip
    tail = logs[-args.tail :]
    mean = [sum(e["angles"][i] for e in tail) / len(tail) for i in range(L - 1)] if tail else []
    return {"rule": name, "class": RULES[name][0], "overrides": {k: repr(v) for k, v in overrides.items()}, "dampings": dampings,
            "epochs": args.epochs, "max_epochs": trainer.max_epochs, "subset": args.subset, "every": args.every, "max_samples": args.max_samples,
            "seconds": seconds, "search": search, "logs": logs, "first": logs[0]["angles"] if logs else [], "tail_mean": mean}  # fmt: skip


def plot(results: dict, out: Path) -> Path:
    L = max((len(r["first"]) for r in results.values()), default=0)
    return plot_layer_logs(results, "angles", L, out, NAME, "GNT angle (degrees)", (0, 95), width=3.0)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.gnt_angles", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "out" / NAME)
    p.add_argument("--rules", default=",".join(RULES), help="comma-separated, of: " + ", ".join(RULES))
    p.add_argument("--epochs", type=int, default=1, help="forward epochs (default: %(default)s)")
    p.add_argument("--pretrain", type=int, default=None, help="feedback pre-training epochs of the rules that have them (default: 6)")
    p.add_argument("--subset", type=int, default=None, help="train on N MNIST images (default: all 60000, 5000 kept out)")
    p.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (tests)")
    p.add_argument("--every", type=int, default=80, help="forward batches between two logs (the authors': 80)")
    p.add_argument("--max-samples", type=int, default=BATCH, help="rows of the batch the angle uses (default: the whole batch)")
    p.add_argument("--tail", type=int, default=3, help="logs averaged for the table (default: the last %(default)s)")
    p.add_argument("--sizes", default="784,256,256,256,256,256,10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="RULE.key=value", help="override a rule argument (JSON value)")
    p.add_argument("--name", default=None, help="key of the results in the JSON (default: the rule; for variants)")
    p.add_argument("--force", action="store_true", help="rerun rules already in the JSON")
    p.add_argument("--search", type=int, default=0, help="after training, the damping search on this many batches (0: off)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in args.rules if r not in RULES]
    if unknown:
        p.error(f"unknown rules {unknown}; expected some of {list(RULES)}")
    args.overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        rule, _, arg = key.partition(".")
        if rule not in RULES or not arg or not value:
            p.error(f"--set takes RULE.key=value with RULE one of {list(RULES)}, got {item!r}")
        args.overrides.setdefault(rule, {})[arg] = json.loads(value)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    torch.set_num_threads(1)
    for name in args.rules:
        key = args.name or name
        if key in results and not args.force:
            continue
        results[key] = run_rule(name, args)
        path.write_text(json.dumps(results, indent=1))  # after every rule: a later run resumes here
        print(key, "first", [round(a, 1) for a in results[key]["first"]], "last", [round(a, 1) for a in results[key]["tail_mean"]],
              f"{results[key]['seconds']:.0f} s", flush=True)  # fmt: skip
    plot(results, args.out)
    return results


if __name__ == "__main__":
    main()
