"""The feedback-schedules experiment (issue 31, item 3): each variant's schedule, and the summary's times, ratios and
angles on hand-made records."""
from __future__ import annotations

import math

import pytest

from experiments import feedback_schedules as ex


def test_the_variants_schedules():
    assert ex.schedule("full", "DRL", 20) is None
    assert ex.schedule("every4", "DDTPLinear", 20) == {"every": 4}
    assert ex.schedule("decreasing", "DRL", 20) == {"iterations": 2, "final_iterations": 0.5, "decay_epochs": 10}  # drl.yaml: 2
    assert ex.schedule("decreasing", "LDRL", 6) == {"iterations": 4, "final_iterations": 1.0, "decay_epochs": 3}  # ldrl.yaml: 4
    assert ex.schedule("closed-form", "DDTPLinear", 20) == {"closed_form": True}
    for variant, rule in (("closed-form", "DRL"), ("every2", "BP")):
        with pytest.raises(ValueError, match=f"{rule} has no variant {variant}"):
            ex.schedule(variant, rule, 20)


def _run(rule, variant, seed, points, test_error, angles=(), steps=None):
    return {"rule": rule, "variant": variant, "seed": seed, "epochs": 4, "diverged": False, "val_points": points,
            "test_error": test_error, "feedback_steps": steps, "angles": list(angles), "machine": "m"}  # fmt: skip


def test_summary_times_ratios_and_late_angles():
    bp = [_run("BP", "full", s, [[1, 10.0, 0.96], [2, 20.0, 0.975], [3, 30.0, 0.981], [4, 40.0, 0.982]], 1.5 + s) for s in (0, 1)]
    angle = lambda epoch, bp_, gn: {"step": 0, "epoch": epoch, "bp": bp_, "gn": gn}  # noqa: E731
    ddtp = [
        _run("DDTPLinear", "every2", 0, [[1, 12.0, 0.97], [2, 24.0, 0.979], [3, 36.0, 0.98], [4, 48.0, 0.98]], 2.0,
             [angle(0, [90.0, 90.0], [90.0]), angle(2, [40.0, 20.0], [30.0]), angle(3, [50.0, 30.0], [50.0])], steps=800),
        _run("DDTPLinear", "every2", 1, [[1, 12.0, 0.96], [2, 24.0, 0.97], [3, 36.0, 0.97], [4, 48.0, 0.975]], 3.0, steps=880),
    ]  # fmt: skip
    rows = ex.summarise(bp + ddtp)
    assert [(r["rule"], r["variant"]) for r in rows] == [("BP", "full"), ("DDTPLinear", "every2")]
    b, d = rows
    assert b["tta"] == {0.97: 20.0, 0.98: 30.0} and b["seconds_per_epoch"] == 10.0 and b["feedback_steps_per_epoch"] is None
    assert d["tta"][0.97] == 18.0 and math.isinf(d["tta"][0.98]) and d["batches_to"][0.97] == 1.5  # seed 1 never reaches 98 %: censored, not the median of one
    assert d["feedback_steps_per_epoch"] == 210.0 and d["seconds_per_epoch"] == 12.0
    assert d["angle_bp"] == [45.0, 25.0] and d["angle_gn"] == 40.0  # epochs 2 and 3 of 4 (the last half), not epoch 0
    block = ex.docs_block(rows, bp + ddtp, "python -m experiments.feedback_schedules")
    assert "| DDTPLinear | every2 | 0, 1 | 12.00 | 210 | 18 s (0.90×), 2 b | not reached | 2.50 ± 0.71 | 45 / 25 | 40 |" in block
    assert "| BP | full | 0, 1 | 10.00 | – | 20 s (1.00×), 2 b | 30 s (1.00×), 3 b | 2.00 ± 0.71 | – | – |" in block
