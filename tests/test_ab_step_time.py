"""scripts/ab_step_time.py runs (against this very checkout, so the ratio is about 1) and names a wrong folder."""
from __future__ import annotations

import importlib.util
import math

import pytest

from conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("ab_step_time", REPO / "scripts" / "ab_step_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_step_time_against_itself(one_thread):
    ratios = _script().main([str(REPO), "--steps", "4", "BP", "DTPAI"])
    assert set(ratios) == {"BP", "DTPAI"} and all(math.isfinite(r) and r > 0 for r in ratios.values())


def test_ab_step_time_names_a_folder_that_is_not_a_checkout(tmp_path):
    with pytest.raises(SystemExit, match="must be a checkout of tplightning"):
        _script().main([str(tmp_path)])


def test_ab_step_time_at_two_thread_counts(one_thread):
    ratios = _script().main(["--threads", "1", "2", "--steps", "4", "BP"])
    assert set(ratios) == {"BP"} and math.isfinite(ratios["BP"]) and ratios["BP"] > 0


def test_ab_step_time_needs_one_mode():
    with pytest.raises(SystemExit, match="give one of OTHER_REPO, --threads A B or --compile"):
        _script().main([])
    with pytest.raises(SystemExit, match="give one of OTHER_REPO, --threads A B or --compile"):
        _script().main(["--threads", "1", "2", "--compile"])


def test_compiled_pieces_train_the_same_rule(one_thread):
    # torch.compile of the targets and gradients: the same weights as eager up to rounding, after several steps
    script = _script()
    import tplightning as tp
    import torch

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = script.build(tp, "DTPAI"), script.build(tp, "DTPAI")
    script.compile_pieces(compiled)
    assert {"targets_from", "forward_grads", "feedback_grads"} <= set(compiled.__dict__) and "forward_all" in compiled.net.__dict__
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        batch = (torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g))
        eager.training_step(batch, k), compiled.training_step(batch, k)
    moved = max((p - q).abs().max().item() for p, q in zip(eager.parameters(), script.build(tp, "DTPAI").parameters()))
    diff = max((p - q).abs().max().item() for p, q in zip(eager.parameters(), compiled.parameters()))
    assert moved > 1e-6 and diff < 1e-3 * moved
    assert counters["stats"]["unique_graphs"] >= 3  # compiled indeed, not run eagerly
