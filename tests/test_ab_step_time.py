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


def test_ab_step_time_needs_a_checkout_or_threads():
    with pytest.raises(SystemExit, match="give OTHER_REPO or --threads A B"):
        _script().main([])
