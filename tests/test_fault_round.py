"""``scripts/fault_round.py``: its classification of outcomes, its case list, and (``-m slow``) a short round."""
from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def fr():
    spec = importlib.util.spec_from_file_location("fault_round", REPO / "scripts" / "fault_round.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_round"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


BANNER = "Seed set to 0\nGPU available: False, used: False\nTPU available: False, using: 0 TPU cores\n"
HINT = "(add --traceback for the full traceback; --help lists the options, --model.help CLASS a class's)"


@pytest.mark.parametrize(
    "rc, timed_out, output, ok, kind",
    [
        (2, False, BANNER + "error: --trainer.max_epochs: max_epochs=0 trains nothing; give at least 1 epoch\n" + HINT, "", "clean"),
        (2, False, "error: a\n" + "  b\n" * 4 + HINT, "", "clean"),  # six lines from the error line on
        (2, False, "error: a\n" + "  b\n" * 5 + HINT, "", "other_error"),  # seven
        (2, False, "usage: train.py [-h]\n" + HINT, "", "other_error"),  # no error line
        (2, False, "error: \n" + HINT, "", "other_error"),  # an error line naming nothing
        (1, False, BANNER + "error: the run diverged\n", "", "other_error"),
        (1, False, 'Traceback (most recent call last):\n  File "x.py", line 3\nZeroDivisionError: integer modulo by zero', "", "traceback"),
        (2, False, "Traceback (most recent call last):\nerror: short after all", "", "traceback"),
        (None, True, BANNER, "", "hang"),
        (0, True, "", "", "hang"),
        (0, False, BANNER + "test/mse 5.09", "", "silent_success"),
        (0, False, BANNER + "test/mse 5.09", "documented: 0 is one thread per core", "accepted"),
        (-9, False, "", "", "other_error"),
    ],
)
def test_classify(fr, rc, timed_out, output, ok, kind):
    assert fr.classify(rc, timed_out, output, ok) == kind


def test_the_case_list_is_the_first_rounds_and_its_fixtures_exist(fr, tmp_path):
    old = [c for c in fr.BAD_CASES if not c.new]
    assert len(old) == 99 and len({c.label for c in fr.BAD_CASES}) == len(fr.BAD_CASES)
    assert all(c.ok for c in fr.BAD_CASES if c.label in ("threads 0", "typo max_epoch", "negative_slope 0"))
    fr.make_broken_files(tmp_path)
    named = {m for c in fr.BAD_CASES for a in (*c.args, *(v for _, v in c.env)) for m in re.findall(r"\{fx\}/([\w.]+)", a)}
    missing = {n for n in named if not (tmp_path / n).exists()} - set(fr.TRAINED)
    assert missing == {"missing.ckpt"}  # the one that must not exist


@pytest.mark.slow
def test_a_short_round_counts_and_resumes(fr, tmp_path):
    out = tmp_path / "round.jsonl"
    args = ["--part", "all", "--only", "3", "--configs", "dtp.yaml", "--kills", "1", "--epochs", "2", "--out", str(out)]
    counts = fr.main(args)
    assert counts["COUNTS"] == {"tried": 3, "clean": 3, "traceback": 0, "hang": 0, "silent_success": 0, "other_error": 0, "accepted": 0}
    crash = counts["CRASH"]
    assert crash["chains"] == 1 and crash["identical_finals"] == 1, crash
    assert crash["zero_byte_ckpts"] == crash["corrupt_ckpts"] == crash["tmp_left_end"] == crash["tmpdir_files_left"] == 0, crash
    lines = out.read_text().splitlines()
    assert [json.loads(line)["record"]["part"] for line in lines] == ["bad"] * 3 + ["crash"]
    assert fr.main(args) == counts and out.read_text().splitlines() == lines  # a rerun finds every case done


def test_a_fit_removes_the_temporary_files_of_dead_saves():
    """The round's leftover: a run killed during its first save keeps its temporary file, and the fit that starts
    afresh (in version_1: there is no last.ckpt to resume) saved nothing into its folder again. A file of a live
    process (this one: another run saving now) stays."""
    import os
    from pathlib import Path

    from tplightning.cli import build

    folder = Path("runs/dtp/version_0/checkpoints")
    folder.mkdir(parents=True)
    dead, live = folder / ".last.ckpt.tmp-tplightning-4194305", folder / f".epoch=0-step=60.ckpt.tmp-tplightning-{os.getpid()}"
    dead.write_bytes(b"\x80partial"), live.write_bytes(b"")
    cli = build(["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])
    assert not dead.exists() and live.exists()
    assert Path(cli.trainer.loggers[0].log_dir) == Path("runs/dtp/version_1")
