"""Runs that would train on nothing, or on broken data, stop with a short error naming the option (exit 2).

Each case below once ran to the end with exit 0 (an untrained model tested, test/mse 0.0, NaN metrics and a "best"
checkpoint made of them) or ended in a long traceback that blamed the learning rate; each goes through
``train.py``'s entry (:func:`tplightning.cli.report` of :func:`tplightning.cli.main`) where it is a command line.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tplightning as tp
from tplightning.__main__ import stock_cli
from tplightning.cli import report
from tplightning.data import MNISTDataModule, TensorData, TensorDataModule
from tplightning.data.base import check_values
from tplightning.errors import ConfigError
from train import main

from conftest import SHARED_DATA, make_rule, quiet_trainer, tiny_data

#: dtp.yaml, briefly: two training batches, one of validation and test
BASE = ["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
LR = "--model.init_args.forward_optimizer.init_args.lr"


def _refused(capsys, *extra) -> str:
    """What a run with ``extra`` prints; it must exit with status 2 after a few lines."""
    with pytest.raises(SystemExit) as info:
        report(main, [*BASE, *extra])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, err
    assert len(err.splitlines()) <= 4 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- runs that train nothing
@pytest.mark.parametrize(
    "extra, option",
    [
        (["--trainer.max_epochs", "0"], "--trainer.max_epochs"),
        (["--trainer.limit_train_batches", "0"], "--trainer.limit_train_batches"),
        (["--trainer.limit_train_batches", "0.0"], "--trainer.limit_train_batches"),
        (["--trainer.max_steps", "0"], "--trainer.max_steps"),
        ([LR, "0"], LR),
    ],
)
def test_a_fit_that_trains_nothing_is_refused(capsys, extra, option):
    err = _refused(capsys, *extra)
    assert err.startswith(f"error: {option}: "), err
    assert "trains nothing" in err


@pytest.mark.parametrize("name", ["val_check_interval", "check_val_every_n_epoch"])
def test_a_zero_validation_interval_is_refused(capsys, name):
    err = _refused(capsys, f"--trainer.{name}", "0")  # Lightning divides by it: a ZeroDivisionError traceback before
    assert err.splitlines()[0] == f"error: --trainer.{name}: {name} must be > 0 (null: no validation by epochs), got 0", err


def test_a_learning_rate_beyond_float32_is_named(capsys):
    err = _refused(capsys, f"{LR}=1e300")  # an overflow inside the optimizer's step before
    assert err.splitlines()[0] == f"error: {LR}: the learning rate must be a finite positive float, got 1e+300", err


def test_the_stock_fit_subcommand_refuses_it_too(capsys):
    from tplightning.__main__ import stock_cli

    with pytest.raises(SystemExit) as info:
        report(stock_cli, ["fit", *BASE, "--trainer.max_epochs", "0"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: --trainer.max_epochs: max_epochs=0 trains nothing"), err


def test_a_zero_learning_rate_points_at_feedback_only(capsys):
    err = _refused(capsys, LR, "0")
    assert "--model.init_args.feedback_only true" in err
    bp = _refused(capsys, "--config", "bp.yaml", LR, "0")  # a rule without learned feedback: no such option to offer
    assert "BP has no feedback weights to train alone" in bp


def test_feedback_only_trains_the_feedback_weights_alone():
    rule = make_rule("DTPAI", sizes=(6, 6, 6, 6), feedback_only=True)
    W0, Q0 = [W.clone() for W in rule.forward_weights], [Q.clone() for Q in rule.feedback_weights]
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(rule, datamodule=tiny_data((6, 6, 6, 6)))
    assert all(torch.equal(a, b) for a, b in zip(W0, rule.forward_weights))
    assert all(not torch.equal(a, b) for a, b in zip(Q0, rule.feedback_weights))


def test_a_zero_forward_rate_with_feedback_only_runs(capsys):
    out = report(main, [*BASE, LR, "0", "--model.init_args.feedback_only", "true"])
    assert set(out["test_metrics"]) == {"test/loss", "test/mse"}


# ----------------------------------------------------------------------------- option values
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_learning_rate_is_named(capsys, value):
    err = _refused(capsys, f"{LR}={value}")  # "--x -inf" would be read as an option
    assert err.splitlines()[0] == f"error: {LR}: the learning rate must be a finite positive float, got {value}"


@pytest.mark.parametrize("text", ["nan", ".nan"])  # a string the parser refuses, a YAML float it accepts
def test_a_non_finite_learning_rate_in_a_config_file_is_named(capsys, tmp_path, text):
    config = tmp_path / "lr.yaml"
    config.write_text("model:\n  init_args:\n    forward_optimizer:\n      class_path: torch.optim.SGD\n"
                      f"      init_args: {{lr: {text}}}\n")  # fmt: skip
    err = _refused(capsys, "--config", str(config))
    assert err.splitlines()[0] == f"error: {LR}: the learning rate must be a finite positive float, got nan"


def test_a_non_finite_feedback_learning_rate_is_named(capsys):
    err = _refused(capsys, "--model.init_args.feedback_optimizer.init_args.lr=-inf")
    assert err.splitlines()[0] == ("error: --model.init_args.feedback_optimizer.init_args.lr: the learning rate must be a "
                                   "finite positive float, got -inf")  # fmt: skip


def test_a_seed_out_of_range_is_named(capsys):
    err = _refused(capsys, "--seed_everything", str(2**70))
    assert err.splitlines()[0] == f"error: --seed_everything: the seed must be an integer in [0, 4294967295], got {2**70}"


def test_a_student_that_does_not_match_its_teacher_is_named(capsys):
    err = _refused(capsys, "--model.init_args.sizes", "[6, 8, 6]")
    assert err.startswith("error: --model.init_args.sizes: InitNearTeacher places the student near its teacher"), err
    assert "--data.init_args.sizes" in err and "given: [6, 8, 6]" in err


def test_constant_student_teacher_inputs_are_refused(capsys):
    err = _refused(capsys, "--data.init_args.input_std", "0")
    assert err.splitlines()[0] == ("error: --data.init_args.input_std: input_std must be a finite number > 0 (0 draws "
                                   "constant inputs), got 0.0")  # fmt: skip


# ----------------------------------------------------------------------------- data refused at setup
def test_check_values_counts_what_is_wrong_in_each_split():
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    x[1, 2], x[4, 0], y[0, 0] = float("nan"), float("-inf"), float("inf")
    with pytest.raises(ConfigError, match=r"^the train split holds 2 non-finite values \(NaN or inf\) in its inputs$"):
        check_values("train", x, y)
    with pytest.raises(ConfigError, match=r"^the test split holds 1 non-finite values \(NaN or inf\) in its targets$"):
        check_values("test", torch.randn(5, 3), y)
    with pytest.raises(ConfigError, match=r"^the val split's 5 inputs are all equal"):
        check_values("val", torch.full((5, 3), 0.5), torch.randn(5, 2))
    with pytest.raises(ConfigError, match=r"^the val split's 5 targets are all equal"):
        check_values("val", torch.randn(5, 3), torch.zeros(5, 2))
    with pytest.raises(ConfigError, match=r"^the train split holds 2 labels outside \[0, 10\)$"):
        check_values("train", torch.randn(4, 3), torch.tensor([0, 10, -1, 9]), "classification", 10)
    check_values("train", torch.randn(4, 3), torch.tensor([3, 3, 3, 3]), "classification", 10)  # one class is no error
    check_values("val", torch.randn(1, 3), torch.randn(1, 2))  # a single item is not "constant"


def test_student_teacher_and_toy_data_check_their_splits(monkeypatch):
    calls = []
    monkeypatch.setattr(TensorDataModule, "check_splits", lambda self: calls.append(type(self).__name__))
    tiny_data().setup()
    tp.ToyDataModule(num_train=4, num_val=4, num_test=4).setup()
    assert calls == ["StudentTeacherDataModule", "ToyDataModule"]


@pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason="needs the shared MNIST files")
def test_mnist_with_a_nan_pixel_is_refused_at_setup(monkeypatch):
    to_float = MNISTDataModule._to_float

    def poisoned(self, images):
        x = to_float(self, images)
        x[0, :3] = float("nan")  # three pixels of the first image of each split
        return x

    monkeypatch.setattr(MNISTDataModule, "_to_float", poisoned)
    data = MNISTDataModule(data_dir=str(SHARED_DATA), num_train=100, num_val=10, subset=200)
    with pytest.raises(ConfigError, match=r"^the train split holds 3 non-finite values \(NaN or inf\) in its inputs$"):
        data.setup()


def test_cifar10_with_constant_test_images_is_refused_at_setup(monkeypatch, tmp_path):
    from tplightning.data import CIFAR10DataModule, cifar10

    def fake(path):  # 20 random training images per batch file; a test batch of 20 black images
        g = torch.Generator().manual_seed(len(path.name))
        images = torch.randint(256, (20, 3, 32, 32), generator=g, dtype=torch.uint8)
        return (torch.zeros_like(images) if path.name == "test_batch" else images), torch.arange(20) % 10

    monkeypatch.setattr(CIFAR10DataModule, "find_files", lambda self: {name: tmp_path / name for name in cifar10.MD5})
    monkeypatch.setattr(cifar10, "read_batch", fake)
    data = CIFAR10DataModule(data_dir=str(tmp_path), num_train=50, num_val=10)
    with pytest.raises(ConfigError, match=r"^the test split's 20 inputs are all equal \(constant data"):
        data.setup()


# ----------------------------------------------------------------------------- data modules that break their word
class Broken(TensorDataModule):
    """6 inputs and 6 outputs declared (regression), the splits as :attr:`kind` says."""

    input_dim, output_dim, task = 6, 6, "regression"
    kind = "fine"

    def __init__(self, batch_size: int = 8):
        super().__init__(batch_size=batch_size, eval_batch_size=8)

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
        train, val = (x.clone(), y), (x.clone(), y)
        if self.kind == "seven features":
            train = (torch.randn(32, 7, generator=g), y)
        elif self.kind == "nan train":
            train[0][5, 2] = float("nan")
        elif self.kind == "nan val":
            val[0][3, 1] = float("nan")
        self.train_data, self.val_data, self.test_data = TensorData(*train), TensorData(*val), TensorData(*val)


class SevenFeatures(Broken):
    kind = "seven features"


class NaNTrain(Broken):
    kind = "nan train"


class NaNVal(Broken):
    kind = "nan val"


class Labels(TensorDataModule):
    """4 classes declared; labels 0..5, or one-hot float rows."""

    input_dim, output_dim, task = 6, 4, "classification"
    one_hot = False

    def __init__(self):
        super().__init__(batch_size=8, eval_batch_size=8)

    def setup(self, stage=None):
        x, y = torch.randn(16, 6), torch.arange(16) % 6
        if self.one_hot:
            y = torch.nn.functional.one_hot(y % 4, 4).float()
        self.train_data = self.val_data = self.test_data = TensorData(x, y)


class OneHot(Labels):
    one_hot = True


def _data(name: str) -> list[str]:
    return ["--data", f"test_refuse_garbage.{name}", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]


CLASSIFY = ["--model.init_args.loss", "cross_entropy", "--model.init_args.sizes", "[6, 6, 4]"]


@pytest.mark.parametrize(
    "name, extra, message",
    [
        ("SevenFeatures", [], "has inputs of shape (32, 7): 7 features per item, the model's sizes[0] is 6"),
        ("NaNTrain", [], "holds 1 non-finite input values (NaN or inf): the data is broken, not the learning rate"),
        ("Labels", CLASSIFY, "has 3 labels outside [0, 4) (smallest 0, largest 5)"),
        ("OneHot", CLASSIFY, "has torch.float32 targets of shape (8, 4); loss='cross_entropy' takes integer class labels"),
    ],
)
def test_the_first_training_batch_is_checked_against_the_network(capsys, name, extra, message):
    err = _refused(capsys, *_data(name), *extra)
    assert err.splitlines()[0].startswith(f"error: --data: the first training batch {message}"), err


def test_nan_validation_inputs_fail_the_run_and_write_no_checkpoint(capsys, tmp_path):
    args = [*BASE, "--data", "test_refuse_garbage.NaNVal", "--trainer.callbacks", "[]",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/loss",
            f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        report(main, args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, err
    assert err.splitlines()[0] == ("error: --data: the val loss is NaN or inf in 1 batch, whose inputs hold NaN or inf: the "
                                   "val data is broken (1 batch with non-finite inputs); no metric or checkpoint is made from it")  # fmt: skip
    assert not list(Path(tmp_path).rglob("*.ckpt"))


def test_a_model_with_non_finite_outputs_fails_its_test():
    rule = make_rule("BP")
    with torch.no_grad():
        rule.net.weights[0].fill_(float("inf"))
    with pytest.raises(tp.DivergenceError, match=r"^the test loss is NaN or inf in 1 batch \(finite inputs\)"):
        quiet_trainer().test(rule, datamodule=tiny_data())


def test_only_the_first_batch_is_checked():
    seen = []

    class Counting(tp.BP):
        def on_train_batch_start(self, batch, batch_idx):
            seen.append(getattr(self, "_batch_unchecked", None))

    rule = Counting(sizes=[6, 6, 6], forward_optimizer=torch.optim.SGD)
    quiet_trainer(limit_val_batches=0).fit(rule, datamodule=tiny_data())
    assert seen == [False] * 8  # checked before the first batch's hooks, then never again


@pytest.mark.parametrize("config", ["dtp.yaml", "tp_ei.yaml"])
@pytest.mark.parametrize("slope", ["0"])
def test_an_activation_the_rule_inverts_must_be_invertible(capsys, config, slope):
    # 6-6-6-6: layer 2's leaky-ReLU is inverted by g_1; with one hidden layer s_1 is never inverted (allowed); a
    # negative slope is refused everywhere (test_a_negative_leaky_slope_is_refused_by_every_rule)
    err = _refused(capsys, "--config", config, "--model.init_args.sizes", "[6, 6, 6, 6]", "--data.init_args.sizes", "[6, 6, 6, 6]",
                   "--model.init_args.negative_slope", slope)  # fmt: skip
    assert err.startswith(f"error: --model.init_args.negative_slope: layer 2 activation LeakyReLU(negative_slope={float(slope)}) has no inverse")


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(capsys, sub):
    """Before, ``python -m tplightning test --config dtp.yaml`` tested the untrained initial weights and exited 0."""
    with pytest.raises(SystemExit) as info:
        report(stock_cli, [sub, "--config", "dtp.yaml"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith(f"error: --ckpt_path: python -m tplightning {sub} evaluates a trained rule"), err


# ----------------------------------------------------------------------------- the fault round's leftovers
@pytest.mark.parametrize("config", ["dtp.yaml", "lee_dtp.yaml", "bp.yaml"])
def test_a_negative_leaky_slope_is_refused_by_every_rule(capsys, config):
    """Before, dtp.yaml (6-6-6: no rule inverts s_1) trained with a slope of -1, which folds s into |a|, and exited 0."""
    err = _refused(capsys, "--config", config, "--model.init_args.negative_slope", "-1")
    assert err.splitlines()[0] == ("error: --model.init_args.negative_slope: leaky_relu negative_slope must be a finite "
                                   "number >= 0 (0: a ReLU), got -1.0"), err  # fmt: skip


def test_a_negative_teacher_slope_is_named(capsys):
    err = _refused(capsys, "--data.init_args.teacher_negative_slope", "-0.5")
    assert err.splitlines()[0] == ("error: --data.init_args.teacher_negative_slope: leaky_relu negative_slope must be a "
                                   "finite number >= 0 (0: a ReLU), got -0.5"), err  # fmt: skip


def test_a_zero_leaky_slope_is_a_relu_refused_only_where_inverted():
    """0 is a ReLU: accepted where no rule inverts the activation (s_1 of 6-6-6, as activation=relu is), refused where
    one does (s_2 of 6-6-6-6, inverted by g_1 = Q_1 s_2^-1)."""
    rule = tp.DTPAI(sizes=[6, 6, 6], negative_slope=0.0, forward_optimizer=torch.optim.SGD)
    h = rule.net.layers[0].activation(torch.tensor([-2.0, 3.0]))
    assert h.tolist() == [0.0, 3.0]
    with pytest.raises(ConfigError, match=r"^layer 2 activation LeakyReLU\(negative_slope=0.0\) has no inverse"):
        tp.DTPAI(sizes=[6, 6, 6, 6], negative_slope=0.0, forward_optimizer=torch.optim.SGD)


@pytest.mark.parametrize("value", ["-1", "0.5"])
def test_gradient_clipping_is_refused_for_manual_optimization(capsys, value):
    """Before, -1 was ignored without a word (exit 0) and 0.5 stopped the fit with Lightning's 30-line traceback."""
    err = _refused(capsys, "--trainer.gradient_clip_val", value)
    assert err.splitlines()[0].startswith("error: --trainer.gradient_clip_val: gradient clipping needs automatic "
                                          f"optimization; the rules compute their own updates"), err  # fmt: skip
    assert f"got {float(value)}: leave it unset" in err


def test_no_clipping_is_no_error():
    rule = make_rule("DTPAI")
    from tplightning.cli import refuse_automatic_options
    from types import SimpleNamespace

    for clip in (None, 0, 0.0):
        refuse_automatic_options(SimpleNamespace(gradient_clip_val=clip, accumulate_grad_batches=1), rule)


def test_gradient_accumulation_is_refused_for_manual_optimization(capsys):
    err = _refused(capsys, "--trainer.accumulate_grad_batches", "2")
    assert err.splitlines()[0].startswith("error: --trainer.accumulate_grad_batches: accumulating gradients needs "
                                          "automatic optimization"), err  # fmt: skip


@pytest.mark.parametrize("key", ["save_dir", "name"])
def test_moving_one_logger_of_two_is_refused(capsys, tmp_path, key):
    """Before, --trainer.logger.init_args.save_dir moved only the TensorBoard logger: one run's logs in two folders."""
    err = _refused(capsys, f"--trainer.logger.init_args.{key}", str(tmp_path / "x") if key == "save_dir" else "other")
    first = err.splitlines()[0]
    assert first.startswith(f"error: --trainer.logger.init_args.{key}: the run's loggers would write to different folders "
                            "(CSVLogger: runs/dtp, TensorBoardLogger: "), err  # fmt: skip
    assert "--trainer.logger '[{class_path: CSVLogger, init_args: {save_dir: " in err
    assert not Path("runs").exists() and not (tmp_path / "x").exists()  # refused before any folder was made


def test_the_list_form_moves_every_logger():
    from tplightning.cli import build

    loggers = ("[{class_path: CSVLogger, init_args: {save_dir: elsewhere, name: dtp}}, "
               "{class_path: TensorBoardLogger, init_args: {save_dir: elsewhere, name: dtp}}]")  # fmt: skip
    trainer = build([*BASE, "--trainer.logger", loggers]).trainer
    assert [Path(lg.log_dir) for lg in trainer.loggers] == [Path("elsewhere/dtp/version_0")] * 2


@pytest.fixture
def bp_checkpoint() -> Path:
    """A bp.yaml run's last.ckpt (6-6-6, two batches)."""
    main(["bp.yaml" if a == "dtp.yaml" else a for a in BASE])
    return Path("runs/bp/version_0/checkpoints/last.ckpt").resolve()


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluating_a_checkpoint_that_does_not_fit_the_config_is_refused(capsys, bp_checkpoint, sub):
    """Before, the stock CLI overlaid the checkpoint's hyper-parameters on the config: dtp.yaml with a BP checkpoint
    evaluated a BP and exited 0, and a config of other sizes was silently replaced by the checkpoint's."""
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.limit_test_batches", "1", "--trainer.limit_val_batches", "1",
             "--trainer.limit_predict_batches", "1"]  # fmt: skip
    for extra, message in (
        (["--config", "dtp.yaml"], f"error: checkpoint {bp_checkpoint} was written by tplightning.rules.backprop.BP, but the "
                                   "model is tplightning.rules.learned.DTPAI; use the config of the run that wrote it"),
        (["--config", "bp.yaml", "--model.init_args.sizes", "[6, 7, 6]"],
         f"error: checkpoint {bp_checkpoint} does not fit the configured BP: net.layers.0.weight is [6, 6] there and "
         "[7, 6] here (the config differs from the run that wrote it)"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            report(stock_cli, [sub, *extra, "--ckpt_path", str(bp_checkpoint), *quiet])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and message in err.splitlines(), err
    assert not list(bp_checkpoint.parent.parent.glob(f"{sub}-*"))  # nothing evaluated, nothing logged
    out = report(stock_cli, [sub, "--config", "bp.yaml", "--ckpt_path", str(bp_checkpoint), *quiet])  # its own config: fine
    assert type(out.model).__name__ == "BP"
