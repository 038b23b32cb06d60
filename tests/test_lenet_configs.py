"""LeNet-5 on MNIST and the CIFAR-10 networks as configs of torch modules (issue 27, items 3 and 5).

The LeNet configs build biotorch's LeNetMNIST (Sanfiz & Akrout 2021) with its recipe (SGD, momentum 0.9, weight decay
1e-3, batch 64, learning rate / 10 at 50 % and 75 % of training); the step schedule is checked against hand-written
rates; the CIFAR-10 configs (Ernoult et al. 2022's VGG-like network, a small residual network) train two steps on fake
CIFAR-shaped batches (the real data is not on these machines).
"""
from __future__ import annotations

import functools

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tplightning as tp
from tplightning._lightning import pl
from tplightning.blocks import Block, Residual, build_module, describe_module
from tplightning.callbacks import StepSchedule
from tplightning.cli import main as train_main
from tplightning.config_files import CONFIG_DIR
from tplightning.errors import ConfigError

from tests.data.test_cifar10 import fake_md5, root  # noqa: F401 - fixtures: fake CIFAR-10 batch files

LENET = ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm", "ddtp_linear", "ldrl"]
RULE = {"bp": "BP", "fa": "FA", "dfa": "DFA", "usf": "USF", "brsf": "BRSF", "frsf": "FRSF", "kp": "KP", "wm": "WM", "ddtp_linear": "DDTPLinear", "ldrl": "LDRL"}
CIFAR = ["vgg_bp", "vgg_ldrl", "resnet_bp", "resnet_ldrl"]


def quiet_trainer(**kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)  # fmt: skip


def lenet_config(stem: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / "mnist" / f"lenet_{stem}.yaml").read_text())


# ------------------------------------------------------------------------------------------------ LeNet configs
@pytest.mark.parametrize("stem", LENET)
def test_lenet_config_is_biotorchs_network_and_recipe(stem):
    cfg = lenet_config(stem)
    model = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == f"tplightning.{RULE[stem]}"
    net = nn.Sequential(*[build_module(m) for m in model["network"]])
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Unflatten", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Flatten",
                     "Linear", "ReLU", "Linear"]  # fmt: skip
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in net if isinstance(m, nn.Conv2d)]
    assert convs == [(1, 6, (5, 5), (2, 2)), (6, 16, (5, 5), (0, 0)), (16, 120, (5, 5), (0, 0))]
    assert [(m.in_features, m.out_features) for m in net if isinstance(m, nn.Linear)] == [(120, 84), (84, 10)]
    # 28x28 padded by 2 is biotorch's 32x32: 32 -conv5-> 28 -pool-> 14 -conv5-> 10 -pool-> 5 -conv5-> 1
    shapes = []
    h = torch.zeros(2, 784)
    for m in net:
        h = m(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes[1] == (6, 28, 28) and shapes[4] == (16, 10, 10) and shapes[7] == (120, 1, 1) and shapes[-1] == (10,)
    assert cfg["data"]["init_args"]["batch_size"] == 64
    assert (cfg["data"]["init_args"]["num_train"], cfg["data"]["init_args"]["num_val"]) == (55000, 5000)
    optimizer = model["forward_optimizer"]
    if optimizer["class_path"] == "torch.optim.SGD":  # the recipe's
        assert optimizer["init_args"]["momentum"] == 0.9 and optimizer["init_args"]["weight_decay"] == 0.001
    schedule = [cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"] == "tplightning.callbacks.StepSchedule"]
    assert schedule == [{"class_path": "tplightning.callbacks.StepSchedule", "init_args": {"milestones": [0.5, 0.75], "gamma": 0.1}}]
    assert model["lr_final_factor"] == 1.0
    epochs = {lenet_config(s)["trainer"]["max_epochs"] for s in LENET}
    assert len(epochs) == 1  # one campaign: every rule trains as long


def test_lenet_splits_into_five_blocks_as_biotorchs_layers():
    rule = tp.BP(network=[build_module(m) for m in lenet_config("bp")["model"]["init_args"]["network"]])
    assert [[type(m).__name__ for m in b.module] for b in rule.net.layers] == [
        ["Unflatten", "Conv2d", "ReLU", "MaxPool2d"], ["Conv2d", "ReLU", "MaxPool2d"], ["Conv2d", "ReLU", "Flatten"],
        ["Linear", "ReLU"], ["Linear"]]  # fmt: skip


# ------------------------------------------------------------------------------------------------ the step schedule
class _Rates(pl.Callback):
    def __init__(self):
        self.rates = []

    def on_train_epoch_start(self, trainer, pl_module):  # runs after StepSchedule's (callbacks run in order)
        self.rates.append([g["lr"] for o in trainer.optimizers for g in o.param_groups])


def _tiny_fit(rule, epochs: int, ckpt_path=None, trainer_callbacks=(), **kw):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    trainer = quiet_trainer(max_epochs=epochs, callbacks=list(trainer_callbacks), **kw)
    trainer.fit(rule, DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=ckpt_path)
    return trainer


def test_step_schedule_divides_the_rates_at_the_milestones():
    rates = _Rates()
    rule = tp.KP(sizes=[4, 5, 3], loss="cross_entropy", lr_final_factor=1.0,
                 forward_optimizer=functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9, weight_decay=1e-3))  # fmt: skip
    _tiny_fit(rule, 8, trainer_callbacks=[StepSchedule([0.5, 0.75], 0.1), rates])
    want = [0.2] * 4 + [0.02] * 2 + [0.002] * 2  # MultiStepLR([4, 6], 0.1) stepped per epoch, by hand
    assert [r[0] for r in rates.rates] == pytest.approx(want, rel=1e-12)
    assert all(r == [r[0]] * len(r) for r in rates.rates)  # KP's B group follows W's


def test_step_schedule_resumes_where_it_stopped(tmp_path):
    rates = _Rates()
    make = functools.partial(tp.BP, sizes=[4, 5, 3], loss="cross_entropy", lr_final_factor=1.0,
                             forward_optimizer=functools.partial(torch.optim.SGD, lr=0.3))  # fmt: skip
    trainer = _tiny_fit(make(), 3, trainer_callbacks=[StepSchedule([0.5], 0.5)], max_steps=-1)
    path = tmp_path / "three.ckpt"
    trainer.save_checkpoint(path)
    _tiny_fit(make(), 6, ckpt_path=path, trainer_callbacks=[StepSchedule([0.5], 0.5), rates])
    assert [r[0] for r in rates.rates] == pytest.approx([0.15, 0.15, 0.15])  # epochs 3-5 of 6: after the milestone at 3


@pytest.mark.parametrize("kw, match", [
    ({"milestones": [0.75, 0.5]}, r"StepSchedule milestones must be increasing fractions of training in \(0, 1\), got \[0.75, 0.5\]"),
    ({"milestones": [1.0]}, r"StepSchedule milestones must be increasing fractions"),
    ({"gamma": 0.0}, r"StepSchedule gamma must be in \(0, 1\], got 0.0"),
])  # fmt: skip
def test_step_schedule_refuses_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        StepSchedule(**kw)


def test_step_schedule_refuses_the_linear_decay_beside_it():
    rule = tp.BP(sizes=[4, 5, 3], loss="cross_entropy", lr_final_factor=0.2)
    with pytest.raises(ConfigError, match=r"StepSchedule replaces the rule's linear learning-rate decay: set the rule's lr_final_factor to 1.0 \(got 0.2\)"):
        _tiny_fit(rule, 2, trainer_callbacks=[StepSchedule()])


# ------------------------------------------------------------------------------------------------ Residual
def test_residual_adds_its_input_and_round_trips():
    torch.manual_seed(0)
    res = Residual([nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1)])
    res.eval()
    x = torch.randn(3, 2, 5, 5)
    conv1, bn, conv2 = res.body[0], res.body[1], res.body[3]
    by_hand = x + conv2(torch.relu((conv1(x) - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
                                   * bn.weight[:, None, None] + bn.bias[:, None, None]))  # fmt: skip
    assert torch.allclose(res(x), by_hand, atol=1e-6)
    again = build_module(describe_module(res))
    again.load_state_dict(res.state_dict())
    again.eval()
    assert torch.equal(again(x), res(x))


def test_residual_block_feedback_is_a_mirrored_residual():
    torch.manual_seed(0)
    block = Block(nn.Sequential(Residual([nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)]), nn.ReLU()),
                  input_shape=(3, 4, 4))  # fmt: skip
    G = block.make_feedback()
    (mirror,) = list(G)
    assert isinstance(mirror, Residual) and [type(m).__name__ for m in mirror.body] == ["ConvTranspose2d", "ConvTranspose2d"]
    v = torch.randn(2, 3, 4, 4)
    assert torch.allclose(G(v), v + mirror.body[1](mirror.body[0](v)))


# ------------------------------------------------------------------------------------------------ CIFAR-10 configs
@pytest.mark.parametrize("stem", CIFAR)
def test_cifar10_config_trains_two_steps_on_fake_batches(stem, root, one_thread):  # noqa: F811 - the fixture
    config = CONFIG_DIR / "cifar10" / f"{stem}.yaml"
    small = ["--data.init_args.num_train", "16", "--data.init_args.num_val", "8", "--data.init_args.data_dir", str(root),
             "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8", "--trainer.max_steps", "2",
             "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
             "--trainer.enable_progress_bar", "false", "--test_on", "final"]  # fmt: skip
    if "ldrl" in stem:
        small += ["--model.init_args.feedback_iterations", "2"]  # the config's 30 per batch is GPU work
    out = train_main(["--config", str(config), *small])
    rule = out["cli"].model
    assert out["cli"].trainer.global_step == 2
    assert rule(torch.zeros(2, 3072)).shape == (2, 10)
    assert 0.0 <= out["test_metrics"]["test/acc"] <= 1.0
    n_blocks = {"vgg": 6, "resnet": 8}[stem.split("_")[0]]
    assert len(rule.net.layers) == n_blocks


# ------------------------------------------------------------------------------------------------ the benchmark's table
def test_lenet_rows_get_their_own_table_beside_biotorchs_row():
    from benchmarks.mnist import hyper_parameters, render

    runs = [{"seed": s, "test_error": e, "best_val_acc": 0.99, "best_epoch": 3, "epochs_run": 3, "seconds": 10.0,
             "seconds_per_epoch": 3.3, "diverged": False, "error": None, "val_acc": [0.9, 0.95, 0.99]}
            for s, e in ((0, 1.0), (1, 1.2))]  # fmt: skip
    rec = {"rule": "LeNet-FA", "config": "mnist/lenet_fa.yaml", "hparams": "h", "command": "c", "date": "d", "machine": "m",
           "epochs": 3, "runs": runs}  # fmt: skip
    text = render([rec])
    fully_connected, lenet = text.split("### LeNet-5 on MNIST, beside biotorch")
    assert "LeNet-FA" not in fully_connected and "| LeNet-FA | `configs/mnist/lenet_fa.yaml` | 1.10 ± 0.14 |" in lenet
    assert "| FA | 1.10 ± 0.14 (2 seeds, 3 epochs) | 1.70 |" in lenet  # sd of 1.0 and 1.2: 0.1414
    assert "| DFA | – | 1.61 |" in lenet and "| KP | – | not in biotorch |" in lenet
    words = hyper_parameters("mnist/lenet_bp.yaml")
    assert words.startswith("13 torch modules (Unflatten, Conv2d, ReLU, MaxPool2d,") and "lr × 0.1 at 0.5, 0.75 of the epochs" in words
