"""A DDP peer that dies or stops responding ends every process within a bounded time, with one line of ours
(issue 28, finding 7: a frozen rank blocked the other silently for at least 180 s; a killed one ended the other with a
107-line gloo traceback)."""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tplightning._lightning import pl
from tplightning.cli import build, report

ROOT = Path(__file__).resolve().parents[1]


class KillRank(pl.Callback):
    """Rank ``rank`` ends itself before batch ``batch`` of the first epoch: ``exit`` (``os._exit``, as a crash) or
    ``stop`` (SIGSTOP, as a frozen process)."""

    def __init__(self, rank: int = 1, batch: int = 5, how: str = "exit"):
        self.rank, self.batch, self.how = rank, batch, how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.current_epoch == 0 and batch_idx == self.batch:
            if self.how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGSTOP)


def test_the_ddp_fragment_sets_a_timeout():
    cli = build(["--config", "dtp.yaml", "--config", "trainer/ddp.yaml"])
    assert cli.config["trainer"]["strategy"]["init_args"]["timeout"] == datetime.timedelta(minutes=1)  # torch's: 30 min


def test_a_failed_process_group_is_one_line_and_exit_1(capsys):
    def lonely(args):  # a peer that never joins: torch.distributed's own error after the timeout
        store = torch.distributed.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, timeout=datetime.timedelta(seconds=1))
        torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=datetime.timedelta(seconds=1))

    with pytest.raises(SystemExit) as info:
        report(lonely, [])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: a process of the distributed run: the distributed run failed: a peer process died or "
                          "did not answer within the timeout (torch.distributed: "), err  # fmt: skip
    with pytest.raises(RuntimeError):  # --traceback: torch's exception as it came
        report(lonely, ["--traceback"])


def test_a_bug_named_runtime_error_keeps_its_traceback():
    def bug(args):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        report(bug, [])


def _ddp_run(tmp_path, *extra) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    args = [sys.executable, str(ROOT / "train.py"), "--config", "dtp.yaml", "--config", "trainer/ddp.yaml", "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--test_on", "none", *extra]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start


@pytest.mark.slow  # 20-45 s on the 2-core machine: two processes start
@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_dies_mid_epoch_ends_the_other_with_our_line(rank, tmp_path):
    proc, seconds = _ddp_run(tmp_path, "--trainer.callbacks+=test_ddp_failures.KillRank", "--trainer.callbacks.init_args.rank", str(rank))
    assert proc.returncode in (1, 3), proc.stderr[-3000:]  # 3: the dead rank 0's own status, when it is the launcher
    other = 1 - rank
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: rank {other} of 2: the distributed run failed: a peer process died or did not answer within "
                     f"the timeout (torch.distributed: {lines[0].split('(torch.distributed: ')[1]}"], proc.stderr[-3000:]  # fmt: skip
    assert "Traceback" not in proc.stderr and seconds < 60 + 60  # the timeout, and the start of two processes


@pytest.mark.slow
def test_a_frozen_rank_ends_the_run_after_the_timeout(tmp_path):
    proc, seconds = _ddp_run(tmp_path, "--trainer.callbacks+=test_ddp_failures.KillRank", "--trainer.callbacks.init_args.how", "stop",
                             "--trainer.strategy.init_args.timeout", "0:00:15")  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: rank 0 of 2: the distributed run failed: a peer process died "
                                                           "or did not answer within the timeout (torch.distributed: Timed out")  # fmt: skip
    assert seconds < 15 + 60
