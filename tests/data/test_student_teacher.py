"""Changing the student alone works on the student-teacher configs (issue 12, point 4).

The data module's teacher settings are named ``teacher_activation``, ``teacher_negative_slope`` and
``teacher_output_activation``: Lightning refuses a run whose model and data module share a
hyper-parameter name with different values, so ``--model.init_args.activation`` used to fail.
"""
from __future__ import annotations

import pytest

from train import main

SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.mark.parametrize(
    "override, attribute",
    [(["--model.init_args.activation", "tanh"], "activation"), (["--model.init_args.negative_slope", "0.2"], "negative_slope")],
)
def test_changing_the_model_alone_works(override, attribute):
    out = main(["--config", "dtp.yaml", *override, *SHORT])
    cli = out["cli"]
    assert str(cli.model.hparams[attribute]) == override[1]
    teacher = cli.datamodule.hparams
    assert (teacher.teacher_activation, teacher.teacher_negative_slope) == ("leaky_relu", 0.35)  # the problem is unchanged
    assert out["test_metrics"]


def test_the_teacher_is_set_on_the_data_module():
    out = main(["--config", "bp.yaml", "--data.init_args.teacher_negative_slope", "0.1", *SHORT])
    act = out["cli"].datamodule.teacher.activations[0]
    assert act.negative_slope == 0.1 and out["cli"].model.hparams.negative_slope == 0.35
