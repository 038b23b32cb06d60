"""The toy, pseudo-inverse and student-teacher experiments: tiny runs write their outputs, and the
toy's properties of thesis section 5.1.1 hold exactly (full-batch expectations, float64)."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

import tplightning as tp
from experiments import pseudo_inverse, student_teacher, toy
from experiments.common import DTYPE, generator, robust_gaussian, single_thread

EXACT = torch.tensor([[1.0], [-1.0]], dtype=DTYPE)  # E over h_0 ~ N(0, 1) of the homogeneous toy


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


# --------------------------------------------------------------------------------------------
# Toy (figs. 5.2-5.4)
# --------------------------------------------------------------------------------------------


def test_exact_batch_is_the_gaussian_expectation():
    t = toy.Toy(nonlinear=True, teacher_seed=1)
    W = torch.tensor([[0.7], [-1.3]], dtype=DTYPE)
    h0 = torch.randn(400_000, 1, generator=generator(0), dtype=DTYPE)
    assert float(t.loss(W, EXACT)) == pytest.approx(float(t.loss(W, h0)), rel=1e-2)


@pytest.mark.parametrize("teacher_seed", [0, 1, 2, 3, 4])
def test_linear_toy_gauss_newton_reaches_the_optimum_in_one_step(teacher_seed):
    t = toy.Toy(nonlinear=False, teacher_seed=teacher_seed)
    W0 = toy.start_point(t)
    W1 = t.step("GN", W0, EXACT, None)
    torch.testing.assert_close(W1, t.W1_star, rtol=0, atol=1e-12)  # eq. 5.11
    assert float(t.loss(W1, EXACT)) < 1e-20 < float(t.loss(W0, EXACT))
    tp_step = t.step("TP", W0, EXACT, 0.8) - W0  # eq. 5.9: -eta^ E[h_0^2] (W_1 - W_1*)
    torch.testing.assert_close(tp_step, -0.8 * (W0 - t.W1_star))


@pytest.mark.parametrize("teacher_seed", [0, 1, 2, 3, 4])
def test_nonlinear_toy_modified_tp_reaches_the_optimum_in_two_steps(teacher_seed):
    t = toy.Toy(nonlinear=True, teacher_seed=teacher_seed)
    W0 = toy.start_point(t)  # every unit on the other side of its kink
    W1 = t.step("MTP", W0, EXACT, 1.0)
    W2 = t.step("MTP", W1, EXACT, 1.0)
    assert float(t.loss(W1, EXACT)) > 1e-3  # not in one step
    assert torch.equal(torch.sign(W1), torch.sign(t.W1_star))  # the first step lands in the optimum's orthant
    torch.testing.assert_close(W2, t.W1_star, rtol=0, atol=1e-12)  # fig. 5.4


def test_nonlinear_toy_tp_is_slower_than_gn_and_bp_zigzags():
    result = toy.run(steps=10, max_steps=400)
    lin, non = result["cases"]["linear"]["methods"], result["cases"]["nonlinear"]["methods"]
    assert lin["GN"]["steps_to_1e-6"] == 1 and non["MTP"]["steps_to_1e-6"] == 2
    assert 1 < lin["TP"]["steps_to_1e-6"] < lin["BP"]["steps_to_1e-6"]
    assert non["GN"]["steps_to_1e-6"] < non["TP"]["steps_to_1e-6"] < non["BP"]["steps_to_1e-6"]


def test_toy_main_writes_figure_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    stats = toy.main(["--out", str(tmp_path), "--steps", "4", "--max-steps", "80"])
    assert (tmp_path / "toy.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert saved["cases"]["linear"]["methods"]["GN"]["steps_to_1e-6"] == 1
    assert set(saved["cases"]["nonlinear"]["methods"]) == {"GN", "TP", "BP", "MTP"}
    assert len(stats["cases"]["linear"]["methods"]["TP"]["path"]) == 5


# --------------------------------------------------------------------------------------------
# Pseudo-inverse (figs. 5.9-5.11)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["thesis", "original"])
def test_inverse_loss_grad_is_autograd_of_the_inverse_loss(form):
    """The batched feedback gradient the figures use is the gradient of mean_b 1/2 ||g(f(h)) - h||^2 per draw."""
    gen = generator(0)
    Q, W = torch.randn(3, 4, 5, generator=gen, dtype=DTYPE), torch.randn(3, 5, 4, generator=gen, dtype=DTYPE)
    h = torch.randn(3, 6, 4, generator=gen, dtype=DTYPE)
    Qr = Q.clone().requires_grad_(True)
    if form == "thesis":  # f = leaky-ReLU(W h), g = Q s^-1
        s = lambda a: torch.nn.functional.leaky_relu(a, 0.35)  # noqa: E731
        s_inv = lambda a: torch.where(a >= 0, a, a / 0.35)  # noqa: E731
        rec = s_inv(s(h @ W.transpose(-1, -2))) @ Qr.transpose(-1, -2)
    else:  # f = tanh(W h), g = tanh(Q h_2)
        rec = torch.tanh(torch.tanh(h @ W.transpose(-1, -2)) @ Qr.transpose(-1, -2))
    loss = 0.5 * (rec - h).pow(2).sum(-1).mean(-1).sum()  # summed over the independent draws
    torch.testing.assert_close(pseudo_inverse.inverse_loss_grad(Q, W, h, form), torch.autograd.grad(loss, Qr)[0])


def test_predicted_limits_are_theorems_4_6_and_4_7():
    gen = generator(0)
    W = robust_gaussian(3, 5, 3, gen=gen)  # expanding 3 -> 5
    eye = torch.eye(3, dtype=DTYPE).expand(3, -1, -1)
    ridge = W.transpose(-1, -2) @ torch.linalg.inv(W @ W.transpose(-1, -2) + 0.2 * torch.eye(5, dtype=DTYPE))
    torch.testing.assert_close(pseudo_inverse.predicted_limit(W, eye, 0.2), ridge)  # theorem 4.7, sigma = 1
    assert pseudo_inverse.predicted_limit(W, eye, 0.0) is None  # W W^T singular: not unique (theorem 4.6)
    W = robust_gaussian(3, 3, 5, gen=gen)  # contracting 5 -> 3, white: W^dagger
    torch.testing.assert_close(pseudo_inverse.predicted_limit(W, torch.eye(5, dtype=DTYPE), 0.0), torch.linalg.pinv(W))


def test_white_noise_contracting_q_converges_to_the_pseudo_inverse():
    case = pseudo_inverse.Case("b", "white, batch 16", 5, 3, batch=16, lr=(0.05, 0.01), iterations=800)
    r = pseudo_inverse.run_case(case, reps=4, gen=generator(0))
    err = r["pinv_error"]["median"]
    assert err[-1] < 0.05 < err[0]


def test_pseudo_inverse_main_writes_figure_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    out = pseudo_inverse.main(["--out", str(tmp_path), "--reps", "2", "--iterations", "60"])
    assert (tmp_path / "pseudo_inverse.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "pseudo_inverse.json").read_text())
    assert len(saved["runs"]) == len(pseudo_inverse.CASES) == len(out["final_medians"])
    assert all(r["iteration"][-1] == 60 for r in saved["runs"])


# --------------------------------------------------------------------------------------------
# Student-teacher with diagnostics (figs. 5.7/5.8, 5.13-5.19)
# --------------------------------------------------------------------------------------------


def test_student_teacher_main_writes_curves_and_diagnostics(tmp_path):
    pytest.importorskip("matplotlib")
    args = ["--out", str(tmp_path), "--seeds", "1", "--epochs", "2", "--num-train", "96", "--diag-every", "1",
            "--rules", "DTPAI,OriginalTP"]  # fmt: skip
    result = student_teacher.main(args)
    assert (tmp_path / "student_teacher.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "student_teacher.json").read_text())
    for rule in ("DTPAI", "OriginalTP"):
        s = saved["summary"][rule]
        assert len(s["train_mse"]) == len(s["test_mse"]) == 3  # before training and after each epoch
        assert len(s["diagnostics"]["cos_gn"]) == 2
    m = result["summary"]["DTPAI"]["diagnostics_mean"]
    assert m["cos_tp"] > 0.99 and m["norm_approx"] < 1e-3  # difference targets: no reconstruction error
    assert result["summary"]["OriginalTP"]["diagnostics_mean"]["norm_approx"] > 0.1


def test_student_teacher_docs_block_names_its_command_and_rules(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from experiments import common

    docs = tmp_path / "experiments.md"
    docs.write_text("# Experiments\n\nkept text\n")
    monkeypatch.setattr(common, "DOCS", docs)
    monkeypatch.setattr(common, "FIGURES", tmp_path / "figures")
    args = ["--out", str(tmp_path / "out"), "--seeds", "1", "--epochs", "1", "--num-train", "64", "--diag-every", "1",
            "--rules", "DTPAI,DRL", "--docs"]  # fmt: skip
    result = student_teacher.main(args)
    text = docs.read_text()
    assert text.startswith("# Experiments\n\nkept text\n")
    block = text.split("<!-- student_teacher:start -->")[1].split("<!-- student_teacher:end -->")[0]
    assert "`python -m experiments.student_teacher --out" in block and block.count("--docs") == 1
    for rule in ("DTPAI", "DRL"):
        cos_gn = result["summary"][rule]["diagnostics_mean"]["cos_gn"]
        assert f"| {rule} |" in block and f"| {cos_gn:.2f} |" in block
    assert "does not hold: DRL closer to e^GN than DTPAI" in block or "holds: DRL closer to e^GN than DTPAI" in block
    assert (tmp_path / "figures" / "student_teacher.png").is_file()


LAB_COMMANDS = (["experiments." + m for m in ("block_diagonal", "factorisation", "pseudo_inverse", "sherman_morrison", "student_teacher", "toy")]
                + ["experiments.dynamics." + m for m in ("signals", "stability", "training")]
                + ["benchmarks." + m for m in ("mnist", "speed", "student_teacher", "syncs", "tune")])  # fmt: skip


@pytest.mark.parametrize("module", LAB_COMMANDS)
def test_usage_line_names_the_module_to_run(module, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0 and capsys.readouterr().out.split()[:4] == ["usage:", "python", "-m", module]
