"""tplightning.convert (issue 27, item 2): an nn.Sequential as a rule's network of blocks. Expectations: the original
torch model (its outputs, autograd + torch.optim on a copy), the same rule on the equivalent Dense network, literal splits
and messages."""
from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tplightning as tp
from tplightning.blocks import Block, convert
from tplightning.errors import ConfigError
from tplightning.layers import Dense

from conftest import REPO, quiet_trainer

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(), nn.Linear(84, 10),
    )  # fmt: skip


def bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AvgPool2d(2)),
        nn.Flatten(), nn.Linear(27, 8), nn.GELU(), nn.Linear(8, 4),
    )  # fmt: skip


def loader(x, y, batch_size=8):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


# ------------------------------------------------------------------------------------------------ the split
def test_default_split_of_lenet():
    net = convert(lenet(), input_shape=(1, 28, 28))
    assert [[type(m).__name__ for m in b.module] for b in net.layers] == [
        ["Conv2d", "Tanh", "MaxPool2d"], ["Conv2d", "Tanh", "MaxPool2d", "Flatten"], ["Linear", "Tanh"], ["Linear", "Tanh"], ["Linear"]]
    assert net.sizes == [784, 1176, 400, 120, 84, 10]
    assert [b.out_shape for b in net.layers] == [(6, 14, 14), (400,), (120,), (84,), (10,)]
    assert [b.activation.name for b in net.layers] == ["tanh", "tanh", "tanh", "tanh", "linear"]


def test_nested_sequentials_are_flattened_and_leading_modules_join_the_first_block():
    net = convert(bn_net())
    assert [[type(m).__name__ for m in b.module] for b in net.layers] == [
        ["Unflatten", "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d", "Flatten"], ["Linear", "GELU"], ["Linear"]]
    assert net.layers[0].in_shape == (36,)  # from the Unflatten


def test_split_points_override_the_default():
    net = convert(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)), split=[0, 4])
    assert [len(b.module) for b in net.layers] == [4, 1]
    with pytest.raises(ConfigError, match=r"split points must be in 0..4 \(the flattened model has 5 modules\), got \[7\]"):
        convert(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)), split=[7])


def test_a_conv_first_model_asks_for_its_input_shape():
    with pytest.raises(ConfigError, match=r"block 1 \(modules 0, 1, 2\): give input_shape: the first module, Conv2d, does not fix"):
        convert(lenet())


# ------------------------------------------------------------------------------------------------ the same function
@pytest.mark.parametrize("make, shape", [(lenet, (5, 1, 28, 28)), (bn_net, (5, 36))])
def test_converted_forward_equals_the_original(make, shape):
    torch.manual_seed(0)
    model = make()
    original = copy.deepcopy(model)
    net = convert(model, input_shape=(1, 28, 28) if make is lenet else None)
    x = torch.randn(*shape)
    model.eval(), original.eval(), net.eval()
    assert torch.equal(net(x), original(x))
    net.train(), original.train()
    assert torch.equal(net(x), original(x))  # training mode: batch statistics in both


@pytest.mark.parametrize("make, shape", [(lenet, (8, 1, 28, 28)), (bn_net, (8, 36))])
def test_bp_on_a_converted_model_takes_the_step_of_autograd_and_torch_optim(make, shape):
    torch.manual_seed(0)
    model = make()
    original = copy.deepcopy(model)
    n_out = 10 if make is lenet else 4
    x, y = torch.randn(*shape), torch.randint(0, n_out, (shape[0],))
    optimizer = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    rule = tp.BP(network=convert(model, input_shape=(1, 28, 28) if make is lenet else None), loss="cross_entropy", forward_optimizer=optimizer)
    quiet_trainer(max_steps=2).fit(rule, loader(torch.cat([x, x]), torch.cat([y, y])))
    opt = optimizer(original.parameters())
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(original(x), y).backward()
        opt.step()
    moved = 0
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
        moved += 1
    assert moved == len(list(original.parameters())) and not torch.equal(model[-1].weight, make()[-1].weight)
    for b0, b1 in zip(model.buffers(), original.buffers()):
        torch.testing.assert_close(b0, b1, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ same as Dense layers
def dense_and_blocks(bias: bool = False):
    torch.manual_seed(1)
    dense = [Dense(6, 5, "tanh", bias=bias), Dense(5, 4, "tanh", bias=bias), Dense(4, 3, "linear", bias=bias)]
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias))
    with torch.no_grad():
        for d, lin in zip(dense, model[::2]):
            lin.weight.copy_(d.weight)
            if bias:
                d.bias.normal_()
                lin.bias.copy_(d.bias)
    return dense, model


@pytest.mark.parametrize("rule, options", [
    (tp.DDTPLinear, {}), (tp.DDTPLinear, {"feedback_init": "random"}), (tp.LDRL, {"feedback_iterations": 3}), (tp.DRL, {}),
    (tp.LeeDTP, {"feedback_noise_std": 0.1}),
])
def test_a_converted_linear_tanh_stack_trains_as_the_dense_network(rule, options):
    dense, model = dense_and_blocks(bias=rule is tp.LDRL)
    x, y = torch.randn(24, 6), torch.randn(24, 3)
    rules = []
    for network in (dense, convert(model)):
        torch.manual_seed(0)  # the feedback weights are drawn from the global generator when the maps are built
        r = rule(network=network, forward_optimizer=SGD, feedback_optimizer=functools.partial(torch.optim.SGD, lr=0.1), **options)
        quiet_trainer(max_steps=3).fit(r, loader(x, y))
        rules.append(r)
    a, b = rules
    initial = dense_and_blocks()[0]
    for la, lb, l0 in zip(a.net.layers, b.net.layers, initial):
        assert not torch.equal(la.weight, l0.weight)  # the step moved the weights
        torch.testing.assert_close(lb.module[0].weight, la.weight, rtol=1e-6, atol=1e-6)
        if la.bias is not None:
            torch.testing.assert_close(lb.module[0].bias, la.bias, rtol=1e-6, atol=1e-6)
    fa, fb = a.feedback_parameters(), b.feedback_parameters()
    assert len(fa) == len(fb) > 0
    for qa, qb in zip(fa, fb):
        assert qb.shape == qa.shape
        torch.testing.assert_close(qb, qa, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ refusals
class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return x


class TupleOut(nn.Module):
    def forward(self, x):
        return x, x


@pytest.mark.parametrize("module, match", [
    (nn.LSTM(4, 4), r"convert cannot serve module 1 \(LSTM: a recurrent module"),
    (nn.GRU(4, 4), r"convert cannot serve module 1 \(GRU: a recurrent module"),
    (nn.MultiheadAttention(4, 2), r"convert cannot serve module 1 \(MultiheadAttention: attention returns a tuple"),
    (nn.MaxPool1d(2, return_indices=True), r"convert cannot serve module 1 \(MaxPool1d\(return_indices=True\) returns a tuple"),
    (Stateful(), r"convert cannot serve module 1 \(Stateful keeps state in buffers \(count\)"),
    (TupleOut(), r"block 1 \(modules 0, 1\): block module 1 \(TupleOut\) returns a tuple, not one tensor"),
])
def test_modules_the_converter_cannot_serve_are_refused_naming_them(module, match):
    with pytest.raises(ConfigError, match=match):
        convert(nn.Sequential(nn.Linear(4, 4), module, nn.Linear(4, 2)))


def test_network_takes_a_sequential_and_refuses_an_lstm():
    assert tp.BP(network=nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))).net.sizes == [3, 4, 2]
    with pytest.raises(ConfigError, match="LSTM"):
        tp.BP(network=[nn.Linear(3, 4), nn.LSTM(4, 4)])


# ------------------------------------------------------------------------------------------------ LeNet-5 and checkpoints
@pytest.mark.parametrize("rule, options", [
    (tp.BP, {}), (tp.DDTPLinear, {"feedback_init": "random"}), (tp.LDRL, {"feedback_iterations": 2}),
])
def test_lenet_trains_a_step_and_its_checkpoint_round_trips(rule, options, tmp_path):
    torch.manual_seed(0)
    model = lenet()
    before = copy.deepcopy(model)
    extra = {} if rule is tp.BP else {"feedback_optimizer": SGD}
    r = rule(network=convert(model, input_shape=(1, 28, 28)), loss="cross_entropy", forward_optimizer=SGD, **extra, **options)
    x, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(r, loader(x, y, batch_size=4))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))  # every block learned
    path = tmp_path / "lenet.ckpt"
    trainer.save_checkpoint(path)
    loaded = tp.load(path)
    assert type(loaded) is rule and [type(b) for b in loaded.net.layers] == [Block] * 5
    r.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), r(x))


class Residual(nn.Module):
    """A module of a user's own, whose constructor arguments torch does not keep."""

    def __init__(self, n: int):
        super().__init__()
        self.body = nn.Linear(n, n)

    def forward(self, x):
        return x + torch.tanh(self.body(x))


def test_a_module_that_cannot_be_described_loads_with_the_model_passed(tmp_path):
    torch.manual_seed(0)
    r = tp.BP(network=nn.Sequential(nn.Linear(3, 4), Residual(4), nn.Linear(4, 2)), forward_optimizer=SGD)
    assert [type(b.module[0]).__name__ for b in r.net.layers] == ["Linear", "Residual", "Linear"]
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(r, loader(torch.randn(4, 3), torch.randn(4, 2)))
    path = tmp_path / "res.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ConfigError, match=r"the constructor arguments of test_convert.Residual were not recorded.*tp.load\(path, network=tp.convert\(model\)\)"):
        tp.load(path)
    loaded = tp.load(path, network=nn.Sequential(nn.Linear(3, 4), Residual(4), nn.Linear(4, 2)))
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), r(x))


def test_a_config_names_torch_modules_and_resumes(tmp_path):
    """``python train.py --config`` with a ``network:`` list of torch modules; tp.load and --ckpt_path rebuild it."""
    config = tmp_path / "net.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        model:
          class_path: tplightning.LDRL
          init_args:
            forward_optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.05}}}}
            feedback_optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.1}}}}
            feedback_iterations: 2
            network:
              - {{class_path: torch.nn.Unflatten, init_args: {{dim: 1, unflattened_size: [1, 4, 4]}}}}
              - {{class_path: torch.nn.Conv2d, init_args: {{in_channels: 1, out_channels: 2, kernel_size: 3, padding: 1}}}}
              - {{class_path: torch.nn.BatchNorm2d, init_args: {{num_features: 2}}}}
              - class_path: torch.nn.Tanh
              - {{class_path: torch.nn.MaxPool2d, init_args: {{kernel_size: 2}}}}
              - class_path: torch.nn.Flatten
              - {{class_path: torch.nn.Linear, init_args: {{in_features: 8, out_features: 3}}}}
        data:
          class_path: tplightning.StudentTeacherDataModule
          init_args: {{sizes: [16, 8, 3], num_train: 64, num_val: 16, num_test: 16, batch_size: 16}}
        trainer:
          max_epochs: 1
          accelerator: cpu
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          callbacks:
            - class_path: tplightning.Checkpoint
              init_args: {{dirpath: {tmp_path / "ckpt"}, save_last: true}}
        """))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, str(REPO / "train.py"), "--config", str(config), "--threads", "1"]
    done = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    rule = tp.load(last)
    assert [[type(m).__name__ for m in b.module] for b in rule.net.layers] == [
        ["Unflatten", "Conv2d", "BatchNorm2d", "Tanh", "MaxPool2d", "Flatten"], ["Linear"]]
    assert int(rule.net.layers[0].module[2].num_batches_tracked) == 4  # 64 samples, batches of 16: once per batch
    resumed = subprocess.run(run + ["--trainer.max_epochs", "2", "--ckpt_path", str(last)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert int(tp.load(last).net.layers[0].module[2].num_batches_tracked) == 8
