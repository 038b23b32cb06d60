"""The null-space share of Meulemans et al. 2020, fig. 2, on its student-teacher setup.

The share of each hidden layer's weight update that lies in the null space of the output's Jacobian with respect to
that layer's weights (:func:`tplightning.diagnostics.null_space_shares`): the part of the update that changes nothing
the loss sees. The paper's claim: DDTP-linear's updates have a smaller null-space share than DTP's.

Setup, read from the authors' ``figure_scripts/figure_toy_nullspace.py`` and ``lib/builders.py``: a 6-6-6-2 student
(tanh hidden layers, linear output, biases, Xavier-normal weights) and a 6-1000-1000-1000-1000-2 ReLU teacher
(Xavier normal with gain 3, zero biases) on inputs uniform in ``[-1, 1]^6``, 400 training samples, MSE, batch 1,
SGD; the forward weights frozen (forward learning rate 0: the update measured is the one the rule would take);
``--pretrain`` (theirs: 30) feedback pre-training epochs, then ``--epochs`` (theirs: 5) epochs each followed by one
feedback-only epoch; the share every ``--every`` (theirs: 10) forward batches. Rules: ``DDTP-linear``
(:class:`~tplightning.rules.drl.DDTPLinear`), ``DTP`` (:class:`~tplightning.rules.learned.OriginalDTP`, the authors'
"DTP (pre-trained)") and ``DRL`` (:class:`~tplightning.rules.drl.DRL`, not in the paper's figure), with the authors'
searched step sizes, feedback rates, ``sigma`` and feedback weight decay (DRL: DTP's), and their Xavier-normal random
feedback weights (``feedback_init="xavier_normal"``) with feedback biases in DTP's and DRL's ``tanh(Q_i h + d_i)``
(``feedback_bias=True``; DDTP-linear's linear direct map has none: a bias would cancel in its targets and loss). Their
MSE is the mean over the 2 outputs and the batch of 1, whose gradient is ours (``1/2 ||o - y||^2``).

Output: ``null_space.json`` (per rule: every logged share per layer and their mean) and ``null_space.png``; a rule in
the JSON is skipped (``--force`` reruns it).

    python -m experiments.null_space [--rules DDTP-linear,DTP] [--pretrain 30] [--epochs 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

import tplightning as tp
from tplightning._lightning import pl
from tplightning.data.base import TensorData, TensorDataModule
from tplightning.diagnostics import TargetPropDiagnostics

from experiments.common import REPO, plot_layer_logs

NAME = "null_space"
SIZES = [6, 6, 6, 2]
TEACHER = [6, 1000, 1000, 1000, 1000, 2]
#: the authors' searched settings (figure_toy_nullspace.py): target step, feedback SGD rate, sigma, feedback weight decay
RULES = {
    "DDTP-linear": ("DDTPLinear", 0.0403226567555006, 0.0022485520139920064, 0.06086642605203958, 9.821494271391093e-05),
    "DTP": ("OriginalDTP", 0.01186235243557516, 0.003289433723080337, 0.09999731226483778, 1.084514667138376e-05),
    "DRL": ("DRL", 0.01186235243557516, 0.003289433723080337, 0.09999731226483778, 1.084514667138376e-05),
}


def teacher_data(num: int, seed: int, teacher: Sequence[int] = TEACHER) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` inputs uniform in ``[-1, 1]^n_0`` and the outputs of a random ReLU teacher (Xavier normal, gain 3, zero
    biases, linear output), float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(num, teacher[0], generator=gen, dtype=torch.float64) * 2 - 1
    h = x
    for k, (n_in, n_out) in enumerate(zip(teacher[:-1], teacher[1:])):
        W = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * 3 * math.sqrt(2.0 / (n_in + n_out))
        h = h @ W.T
        if k < len(teacher) - 2:
            h = torch.relu(h)
    return x.float(), h.float()


class _Data(TensorDataModule):
    task, input_dim, output_dim = "regression", SIZES[0], SIZES[-1]

    def __init__(self, x, y, shuffle_seed: int = 0):
        super().__init__(batch_size=1, eval_batch_size=len(x), shuffle_seed=shuffle_seed)
        self.x, self.y = x, y

    def setup(self, stage=None):
        self.train_data = self.val_data = self.test_data = TensorData(self.x, self.y)


def build(name: str, pretrain: int, seed: int = 0):
    cls_name, eta, lr_fb, sigma, wd = RULES[name]
    pl.seed_everything(seed)
    rule = getattr(tp, cls_name)(
        sizes=SIZES, activation="tanh", output_activation="linear", loss="mse", bias=True, init="xavier_normal", lr_final_factor=1.0,
        forward_optimizer=functools.partial(torch.optim.SGD, lr=0.0), target_stepsize=eta,
        feedback_optimizer=functools.partial(torch.optim.SGD, lr=lr_fb, weight_decay=wd), feedback_noise_std=sigma,
        feedback_init="xavier_normal", feedback_pretrain_epochs=pretrain, feedback_extra_epochs=1,
        feedback_bias=cls_name != "DDTPLinear", **({"feedback_first": True} if cls_name != "OriginalDTP" else {}),
    )  # fmt: skip
    return rule


def run_rule(name: str, args) -> dict:
    x, y = teacher_data(args.num_train, args.seed)
    rule = build(name, args.pretrain, args.seed)
    diag = TargetPropDiagnostics(every_n_steps=args.every, max_samples=1, signals=False, null_space=True, forward_batches_only=True)
    epochs = args.pretrain + 2 * args.epochs - 1
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[diag])  # fmt: skip
    start = time.perf_counter()
    trainer.fit(rule, datamodule=_Data(x, y, args.seed))
    hidden = range(1, len(SIZES) - 1)
    logs = [{"forward_step": h["step"], "shares": [h[f"diag/null_share_{i}"] for i in hidden]} for h in diag.history if "diag/null_share_1" in h]
    mean = [sum(e["shares"][c] for e in logs) / len(logs) for c in range(len(hidden))] if logs else []
    return {"rule": name, "pretrain": args.pretrain, "epochs": args.epochs, "num_train": args.num_train, "seconds": time.perf_counter() - start,
            "logs": logs, "mean": mean}  # fmt: skip


def plot(results: dict, out: Path) -> Path:
    L = max((len(r["mean"]) for r in results.values()), default=1)
    return plot_layer_logs(results, "shares", L, out, NAME, "null-space share", (0, 1), width=3.2, lw=0.8)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.null_space", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "out" / NAME)
    p.add_argument("--rules", default="DDTP-linear,DTP,DRL")
    p.add_argument("--pretrain", type=int, default=30)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    rules = [r for r in args.rules.split(",") if r]
    if any(r not in RULES for r in rules):
        p.error(f"--rules takes some of {list(RULES)}, got {rules}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    torch.set_num_threads(1)
    for name in rules:
        if name in results and not args.force:
            continue
        results[name] = run_rule(name, args)
        path.write_text(json.dumps(results, indent=1))
        print(name, "mean null-space share per hidden layer", [round(v, 3) for v in results[name]["mean"]], f"{results[name]['seconds']:.0f} s", flush=True)
    plot(results, args.out)
    return results


if __name__ == "__main__":
    main()
