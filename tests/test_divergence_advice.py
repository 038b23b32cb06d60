"""The divergence advice names the checkpoint actually last good and, followed, finishes the run (issue 28, finding 5).

``tp_ei_woodbury.yaml`` at 10 x its learning rate diverges in epoch 4; the advised resume from the last good checkpoint
with a tenth of the rate diverged again one batch later, and its message offered no checkpoint at all.
"""
from __future__ import annotations

import re

import shlex

import pytest
import torch

from tplightning.rules.base import DivergenceError
from train import main

TEN_X = ["--config", "tp_ei_woodbury.yaml", "--model.init_args.forward_optimizer.init_args.lr", "1.0", "--test_on", "none",
         "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]  # fmt: skip
LR = "--model.init_args.forward_optimizer.init_args.lr"


def _advice(message: str) -> list[str]:
    return shlex.split(re.split(r"python train\.py |tplightning-train ", message, maxsplit=1)[1])


def _follow(args: list[str], most: int = 3) -> tuple[dict, list[str]]:
    """Run ``args``, then each advised command, until a run finishes (at most ``most`` advices); the messages."""
    messages = []
    for _ in range(most + 1):
        try:
            return main(args), messages
        except DivergenceError as err:
            messages.append(str(err))
            args = _advice(str(err))
    raise AssertionError(f"still diverging after {most} advices:\n" + "\n".join(messages))


def _passes(path) -> bool:
    state = torch.load(path, weights_only=False)["state_dict"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_resume_that_diverges_again_is_offered_the_same_checkpoint_with_a_tenth_again():
    # a short, constant-rate version of the 10x run: it diverges in epoch 5 of 6
    short = [*TEN_X, "--trainer.max_epochs", "6", "--model.init_args.lr_final_factor", "1.0"]
    with pytest.raises(DivergenceError) as info:
        main(short)
    first = str(info.value)
    assert first.startswith("training diverged at batch 303 (epoch 5): loss is inf, first non-finite activation in the output loss")
    advice = _advice(first)
    ckpt = advice[advice.index("--ckpt_path") + 1]
    assert f"To continue from the last good one ({ckpt}, the newest that passed the check) with a tenth" in first
    assert torch.load(ckpt, weights_only=False)["epoch"] == 4 and _passes(ckpt)
    assert advice[advice.index(LR) + 1] == "0.1"
    advice[advice.index(LR) + 1] = "1.0"  # resumed at the same rate, it diverges again at the same batch
    with pytest.raises(DivergenceError) as info:
        main(advice)
    again = str(info.value)
    assert again.startswith("training diverged at batch 303 (epoch 5)")
    # the same checkpoint, at a tenth of the rate again (worded as a second divergence, or, where the resumed epoch's
    # end was written once more before the divergence, as that checkpoint: the same file, the same command)
    assert (f"The run resumed from {ckpt} diverged again before writing a checkpoint. To retry from the same checkpoint "
            "with a tenth of the learning rate again: " in again) or f"To continue from the last good one ({ckpt}," in again, again
    retry = _advice(again)
    assert retry[retry.index("--ckpt_path") + 1] == ckpt and retry[retry.index(LR) + 1] == "0.1"
    out = main(retry)
    assert out["cli"].model.batches_seen == 6 * 60


def test_following_the_advice_finishes_tp_ei_woodbury_at_ten_times_its_rate():
    out, messages = _follow(list(TEN_X))
    assert out["cli"].model.batches_seen == 60 * 60
    assert len(messages) == 2 and "diverged again" in messages[1]
    assert all(torch.isfinite(v).all() for v in out["cli"].model.state_dict().values() if v.is_floating_point())
