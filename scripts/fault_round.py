"""The fault round: bad invocations of the command line, and training runs killed at random moments and resumed.

``python scripts/fault_round.py --part bad|crash|all --out FILE.jsonl`` (from the checkout root).

**bad**: every invocation of :data:`BAD_CASES` (the options, configs and checkpoints a user can get wrong) runs
``train.py`` or ``python -m tplightning`` in a fresh empty folder, with generated fixtures (broken configs and
checkpoints, written into a temporary folder), a time limit (``--timeout``) and a 4 GiB address-space limit. Each
outcome is one of (:func:`classify`):

* ``clean``: exit status 2 with a short message (at most :data:`MAX_MESSAGE_LINES` lines from its ``error`` line on)
  and no traceback;
* ``traceback``: a Python traceback in the output;
* ``hang``: still running at the time limit (killed);
* ``silent_success``: exit 0 for an invocation that should fail;
* ``accepted``: exit 0 for one of the few invocations whose success is intended (each case says why);
* ``other_error``: anything else (another exit status, a long message, an error line naming nothing).

**crash**: for each config (``--configs``, shortened to ``--epochs`` epochs), one uninterrupted run, then chains of
``--kills-per-chain`` runs each killed by SIGKILL (at a random moment, or, for every other kill, as soon as a
checkpoint's temporary file appears in its folder: during a save), each resumed with ``--ckpt_path last`` (a fresh
start when no ``last.ckpt`` exists yet), and a final resume that runs to the end. The runs to be killed see a slow
disk (every ``os.fsync`` waits :data:`SLOW_FSYNC` seconds first), so that a kill aimed at a save lands while the
temporary file is being written. ``TMPDIR`` is a fresh folder on
``/dev/shm`` when there is one (another filesystem than the runs: a rename there would be a copy). After each kill
every ``*.ckpt`` of the run is read back (zero-byte and unreadable files counted), and temporary files left in the
checkpoint folders and in ``TMPDIR`` are counted; the final weights (the last checkpoint's ``state_dict``) and test
metrics (``metrics.csv``) are compared bit for bit with the uninterrupted run's.

Each finished case is appended to ``--out`` as a checksummed record (:func:`benchmarks.common.append_record`); a
rerun with the same ``--out`` skips the cases already there, so a killed round resumes. The last lines printed are
``COUNTS {...}`` (bad invocations, the round's 99 cases), ``COUNTS_NEW {...}`` (cases added since) and
``CRASH {...}``, computed from every record in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import Kind, append_record, read_records  # noqa: E402

#: the longest message (its ``error`` line and what follows) that counts as clean
MAX_MESSAGE_LINES = 6
#: the kinds of outcome of a bad invocation, in the order COUNTS prints them
KINDS = ("clean", "traceback", "hang", "silent_success", "other_error", "accepted")
BAD_FIELDS = {"label": "str", "kind": "str", "rc": "int|null", "secs": "number", "nlines": "int", "cmd": "str", "tail": "list",
              "new": "bool"}  # fmt: skip
CRASH_FIELDS = {"config": "str", "chain": "int", "epochs": "int", "kills": "list", "resumes": "int", "restarts": "int",
                "identical_weights": "bool", "identical_metrics": "bool", "tmp_left_end": "int", "tmpdir_left": "int"}  # fmt: skip


def _problem(record: dict) -> str | None:
    """What a record of either part lacks (:class:`benchmarks.common.Kind`'s ``check``)."""
    fields = BAD_FIELDS if record["part"] == "bad" else CRASH_FIELDS if record["part"] == "crash" else None
    if fields is None:
        return f"part {record['part']!r}, not 'bad' or 'crash'"
    return Kind("fault-part", fields).problem(record)


RECORD_KIND = Kind("fault-case", {"part": "str"}, check=_problem)


def _records(out: Path, part: str) -> list[dict]:
    return [e.record for e in read_records(out, RECORD_KIND) if e.record["part"] == part]
MEMORY_LIMIT = 4 << 30
TMP_MARK = ".tmp-tplightning-"  # tplightning.checkpoints.TMP_MARK, read here without importing the library

# ----------------------------------------------------------------------------------------------- bad invocations
SHORT = ["--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
NO_BAR = ["--trainer.enable_progress_bar", "false"]


@dataclass(frozen=True)
class Case:
    """One bad invocation: ``args`` after ``train.py`` (or after ``python -m tplightning`` when ``module``), with
    ``{fx}`` standing for the fixture folder; ``env`` added to the environment; ``ok``: why exit 0 is the intended
    outcome (empty: it must fail); ``new``: added after the first round (counted apart)."""

    label: str
    args: tuple
    module: bool = False
    env: tuple = ()
    ok: str = ""
    new: bool = False


def _dtp(*extra, ok: str = "", new: bool = False, label: str = "") -> Case:
    return Case(label, ("--config", "dtp.yaml", *SHORT, *extra), ok=ok, new=new)


def _cases() -> list[Case]:
    c = []

    def dtp(label, *extra, **kw):
        c.append(_dtp(*extra, label=label, **kw))

    dtp("max_epochs 0", "--trainer.max_epochs", "0")
    dtp("max_epochs -2", "--trainer.max_epochs", "-2")
    dtp("max_epochs abc", "--trainer.max_epochs", "abc")
    dtp("max_epochs 1.5", "--trainer.max_epochs", "1.5")
    c.append(Case("max_epochs missing value", ("--config", "dtp.yaml", *NO_BAR, "--trainer.max_epochs")))
    dtp("max_steps 0", "--trainer.max_steps", "0")
    for v in ("0", "-1", "1.5"):
        dtp(f"limit_train_batches {v}", "--trainer.limit_train_batches", v)
    dtp("limit_val_batches nan", "--trainer.limit_val_batches", "nan")
    dtp("val_check_interval 0", "--trainer.val_check_interval", "0")
    dtp("check_val_every_n_epoch 0", "--trainer.check_val_every_n_epoch", "0")
    dtp("gradient_clip_val -1", "--trainer.gradient_clip_val", "-1")
    lr, fb = "--model.forward_optimizer.init_args.lr", "--model.feedback_optimizer.init_args.lr"
    for v in ("0", "nan", "inf", "-0.1", "abc"):
        dtp(f"lr {v}", lr, v)
    dtp("lr 1e300 (diverges)", lr, "1e300")
    dtp("feedback lr nan", fb, "nan")
    dtp("target_stepsize nan", "--model.target_stepsize", "nan")
    dtp("target_stepsize -1", "--model.target_stepsize", "-1")
    dtp("negative_slope 0", "--model.negative_slope", "0",
        ok="0 is a ReLU at s_1 of the 6-6-6 network, which no rule inverts (as --model.init_args.activation relu); "
           "refused where a rule inverts it (see 'negative_slope 0, 6-6-6-6')")  # fmt: skip
    dtp("negative_slope -1", "--model.negative_slope", "-1")
    dtp("lr_final_factor -1", "--model.lr_final_factor", "-1")
    dtp("lr_final_factor nan", "--model.lr_final_factor", "nan")
    dtp("feedback_noise_std -1", "--model.feedback_noise_std", "-1")
    dtp("feedback_noise_std inf", "--model.feedback_noise_std", "inf")
    dtp("model sizes [6,6] vs data [6,6,6]", "--model.sizes", "[6, 6]")
    dtp("model sizes [6,7,6] vs data", "--model.sizes", "[6, 7, 6]")
    dtp("model sizes []", "--model.sizes", "[]")
    dtp("model sizes [6,0,6]", "--model.sizes", "[6, 0, 6]", "--data.sizes", "[6, 0, 6]")
    dtp("activation bogus", "--model.activation", "bogus")
    dtp("loss bogus", "--model.loss", "bogus")
    dtp("model class bogus", "--model", "tplightning.Bogus")
    dtp("model init_args unknown key", "--model.init_args.bogus", "1")
    dtp("data class bogus", "--data", "tplightning.NoSuchData")
    dtp("batch_size 0", "--data.batch_size", "0")
    dtp("batch_size -5", "--data.batch_size", "-5")
    dtp("num_train 0", "--data.num_train", "0")
    dtp("num_train -1", "--data.num_train", "-1")
    dtp("num_test 0", "--data.num_test", "0")
    dtp("input_std 0", "--data.input_std", "0")
    dtp("input_std nan", "--data.input_std", "nan")
    dtp("teacher_activation bogus", "--data.teacher_activation", "bogus")
    dtp("teacher_std inf", "--data.teacher_std", "inf")
    dtp("seed 2**70", "--seed_everything", str(2**70))
    dtp("seed -1", "--seed_everything", "-1")
    dtp("seed abc", "--seed_everything", "abc")
    dtp("unknown option", "--nonexistent_option", "3")
    dtp("typo max_epoch", "--trainer.max_epoch", "3",
        ok="argparse reads an unambiguous prefix as the option: --trainer.max_epoch is --trainer.max_epochs, as meant")
    dtp("positional junk", "junk")
    dtp("accelerator gpu (none)", "--trainer.accelerator", "gpu")
    dtp("devices 0", "--trainer.devices", "0")
    dtp("precision 7", "--trainer.precision", "7")
    dtp("threads 0", "--threads", "0", ok="--threads 0 means one thread per core (documented in --help)")
    dtp("threads -1", "--threads", "-1")
    dtp("test_on bogus", "--test_on", "bogus")
    dtp("logger list: .init_args.save_dir", "--trainer.logger.init_args.save_dir", "x")
    dtp("logger list: .save_dir", "--trainer.logger.save_dir", "x")
    dtp("logger 5", "--trainer.logger", "5")
    dtp("logger bogus class", "--trainer.logger", "[{class_path: BogusLogger}]")
    dtp("callbacks+= bogus", "--trainer.callbacks+=", "BogusCallback")
    c.append(Case("config missing file", ("--config", "nonexistent.yaml", *NO_BAR)))
    c.append(Case("config folder", ("--config", "{fx}/cfgdir", *NO_BAR)))
    c.append(Case("config empty", ("--config", "{fx}/empty.yaml", *SHORT)))
    for name, label in (("binary", "config binary"), ("huge", "config huge 2.7MB"), ("bomb", "config alias bomb"),
                        ("selfref", "config self-referencing alias"), ("syntax", "config syntax error"),
                        ("list", "config is a list")):  # fmt: skip
        c.append(Case(label, ("--config", f"{{fx}}/{name}.yaml", *NO_BAR)))
    c.append(Case("config unknown key", ("--config", "dtp.yaml", "--config", "{fx}/unknown.yaml", *SHORT)))
    c.append(Case("config /dev/zero", ("--config", "/dev/zero", *NO_BAR)))
    dtp("ckpt_path last, no run", "--ckpt_path", "last")
    for name, label in (("missing", "missing"), ("ckdir", "folder"), ("zero", "zero-byte"), ("truncated", "truncated"),
                        ("text", "text file")):  # fmt: skip
        dtp(f"ckpt_path {label}", "--ckpt_path", f"{{fx}}/{name}" + ("" if name == "ckdir" else ".ckpt"))
    for p in (50, 75, 90):
        dtp(f"ckpt_path bit flip {p}%", "--trainer.max_epochs", "2", "--ckpt_path", f"{{fx}}/flip{p}.ckpt")
    dtp("ckpt_path foreign dict", "--ckpt_path", "{fx}/foreign.ckpt")
    dtp("ckpt_path foreign state_dict", "--ckpt_path", "{fx}/foreignsd.ckpt")
    dtp("ckpt_path of another rule (bp) into dtp", "--trainer.max_epochs", "2", "--ckpt_path", "{fx}/bp.ckpt")
    dtp("ckpt_path /dev/null", "--ckpt_path", "/dev/null")
    dtp("ckpt resume into smaller max_epochs (ckpt at epoch 1, max 1)", "--ckpt_path", "{fx}/good.ckpt",
        ok="a resume of a run that has done its max_epochs: Lightning trains nothing more and tests the checkpoint's "
           "weights, as for any fit whose end is reached (arguably worth a warning)")  # fmt: skip
    c.append(Case("mnist with empty data dir (no network)", ("--config", "mnist/bp.yaml", *SHORT), env=(("TPLIGHTNING_DATA", "{fx}/emptydata"),)))
    c.append(Case("mnist num_train 0", ("--config", "mnist/bp.yaml", "--trainer.max_epochs", "1", "--data.num_train", "0", *NO_BAR)))
    c.append(Case("mnist subset/num_val too large", ("--config", "mnist/bp.yaml", "--trainer.max_epochs", "1", "--data.num_val", "100000", *NO_BAR)))

    def mod(label, *args, **kw):
        c.append(Case(label, args, module=True, **kw))

    mod("-m tplightning no subcommand", "--config", "dtp.yaml")
    mod("-m tplightning bogus subcommand", "bogus", "--config", "dtp.yaml")
    mod("-m tplightning predict without checkpoint", "predict", "--config", "dtp.yaml", *NO_BAR)
    mod("-m tplightning test without checkpoint", "test", "--config", "dtp.yaml", *NO_BAR)
    mod("-m tplightning test missing ckpt", "test", "--config", "dtp.yaml", "--ckpt_path", "{fx}/missing.ckpt", *NO_BAR)
    mod("-m tplightning validate truncated ckpt", "validate", "--config", "dtp.yaml", "--ckpt_path", "{fx}/truncated.ckpt", *NO_BAR)
    mod("-m tplightning predict bp ckpt into dtp", "predict", "--config", "dtp.yaml", "--ckpt_path", "{fx}/bp.ckpt", *NO_BAR)
    mod("-m tplightning fit max_epochs 0", "fit", "--config", "dtp.yaml", "--trainer.max_epochs", "0", *NO_BAR)
    # added after the round: the fixed leftovers' neighbours
    dtp("gradient_clip_val 0.5", "--trainer.gradient_clip_val", "0.5", new=True)
    dtp("accumulate_grad_batches 2", "--trainer.accumulate_grad_batches", "2", new=True)
    dtp("negative_slope 0, 6-6-6-6", "--model.sizes", "[6, 6, 6, 6]", "--data.sizes", "[6, 6, 6, 6]", "--model.negative_slope", "0", new=True)
    dtp("logger list: .init_args.name", "--trainer.logger.init_args.name", "other", new=True)
    mod("-m tplightning test bp ckpt, sizes [6,7,6]", "test", "--config", "bp.yaml", "--model.init_args.sizes", "[6, 7, 6]",
        "--ckpt_path", "{fx}/bp.ckpt", *NO_BAR, new=True)  # fmt: skip
    mod("-m tplightning validate dtp ckpt into tp_ei", "validate", "--config", "tp_ei.yaml", "--ckpt_path", "{fx}/good.ckpt", *NO_BAR, new=True)
    return c


BAD_CASES = _cases()


def classify(rc: int | None, timed_out: bool, output: str, ok: str = "") -> str:
    """The kind of an outcome (see the module's docstring): ``rc`` the exit status (``None`` or negative: killed),
    ``output`` stdout and stderr together, ``ok`` why success is intended (empty: the invocation must fail).

    >>> classify(2, False, "Seed set to 0\\nerror: --trainer.max_epochs: max_epochs=0 trains nothing\\n(hint)")
    'clean'
    >>> classify(1, False, "Traceback (most recent call last):\\n  File ...\\nZeroDivisionError: integer modulo by zero")
    'traceback'
    >>> classify(None, True, ""), classify(0, False, "test/mse 5.09"), classify(0, False, "", ok="documented")
    ('hang', 'silent_success', 'accepted')
    >>> classify(2, False, "error: x\\n" + "more\\n" * 6), classify(2, False, "usage: nothing named"), classify(-9, False, "")
    ('other_error', 'other_error', 'other_error')
    """
    if timed_out:
        return "hang"
    if "Traceback (most recent call last)" in output:
        return "traceback"
    if rc == 0:
        return "accepted" if ok else "silent_success"
    lines = [line for line in output.splitlines() if line.strip()]
    first = next((k for k, line in enumerate(lines) if line.startswith("error")), None)
    if rc == 2 and first is not None and len(lines) - first <= MAX_MESSAGE_LINES and len(lines[first]) > len("error: "):
        return "clean"
    return "other_error"


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int | None, bool, str, float]:
    """Run ``cmd`` in its own process group with a memory limit; ``(rc, timed_out, output, seconds)``."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True, preexec_fn=limit)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, False, out, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, True, out, time.monotonic() - start


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("TPLIGHTNING_TRACEBACK", None)
    return env


def _train(args: list[str], cwd: Path, env: dict, timeout: float = 600) -> None:
    """A fixture run; its failure is a failure of the round."""
    rc, timed_out, out, _ = _run([sys.executable, str(ROOT / "train.py"), *args], cwd, env, timeout)
    if rc != 0:
        raise SystemExit(f"fixture run {' '.join(args)} failed ({'timeout' if timed_out else rc}):\n{out[-3000:]}")


#: the fixtures that :func:`make_fixtures` trains: ``good.ckpt`` and ``bp.ckpt`` (one epoch of dtp.yaml, bp.yaml), and
#: the files made from ``good.ckpt``
TRAINED = ("good.ckpt", "bp.ckpt", "truncated.ckpt", "flip50.ckpt", "flip75.ckpt", "flip90.ckpt")


def make_fixtures(fx: Path, env: dict) -> None:
    """Write the broken configs and checkpoints the cases name into ``fx``: :func:`make_broken_files`, then the two
    good checkpoints (short runs of dtp.yaml and bp.yaml, one epoch) and the truncated and bit-flipped copies of the
    first."""
    make_broken_files(fx)
    for config, name in (("dtp.yaml", "good"), ("bp.yaml", "bp")):
        work = fx / f"run-{name}"
        work.mkdir(exist_ok=True)
        _train(["--config", config, *SHORT], work, env)
        stem = config.removesuffix(".yaml")
        shutil.copy(work / "runs" / stem / "version_0" / "checkpoints" / "last.ckpt", fx / f"{name}.ckpt")
    good = (fx / "good.ckpt").read_bytes()
    (fx / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    for p in (50, 75, 90):
        data = bytearray(good)
        data[len(data) * p // 100] ^= 1
        (fx / f"flip{p}.ckpt").write_bytes(bytes(data))


def make_broken_files(fx: Path) -> None:
    """The fixtures that need no training: broken configs, non-checkpoints, empty folders."""
    import torch

    fx.mkdir(parents=True, exist_ok=True)
    for name in ("cfgdir", "ckdir", "emptydata"):
        (fx / name).mkdir(exist_ok=True)
    (fx / "empty.yaml").write_text("")
    (fx / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    (fx / "huge.yaml").write_text("seed_everything: 0\n# " + "x" * 100 + "\n" + "a_key: 1\n" * 300_000)
    levels = "abcdefghi"
    bomb = [f"a: &a [{', '.join(['x'] * 9)}]"]
    bomb += [f"{k}: &{k} [{', '.join(['*' + p] * 9)}]" for p, k in zip(levels, levels[1:])]
    (fx / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    (fx / "selfref.yaml").write_text("a: &a [*a]\n")
    (fx / "syntax.yaml").write_text("trainer: {max_epochs: 1\nmodel: [\n")
    (fx / "list.yaml").write_text("- 1\n- 2\n")
    (fx / "unknown.yaml").write_text("bogus_top_level: 3\n")
    (fx / "zero.ckpt").write_bytes(b"")
    (fx / "text.ckpt").write_text("hello, not a checkpoint\n")
    torch.save({"a": torch.ones(3)}, fx / "foreign.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, fx / "foreignsd.ckpt")


def run_bad(out: Path, work: Path, timeout: float, only: int | None) -> None:
    done = {r["label"] for r in _records(out, "bad")}
    cases = [c for c in BAD_CASES[:only] if c.label not in done]
    if not cases:
        return
    fx = work / "fixtures"
    env = _env()
    if not (fx / "flip90.ckpt").is_file():
        make_fixtures(fx, env)
    for n, case in enumerate(cases, 1):
        args = [a.replace("{fx}", str(fx)) for a in case.args]
        cmd = [sys.executable, "-m", "tplightning", *args] if case.module else [sys.executable, str(ROOT / "train.py"), *args]
        cwd = Path(tempfile.mkdtemp(prefix="case-", dir=work))
        rc, timed_out, output, secs = _run(cmd, cwd, _env(**{k: v.replace("{fx}", str(fx)) for k, v in case.env}), timeout)
        kind = classify(rc, timed_out, output, case.ok)
        lines = [line for line in output.splitlines() if line.strip()]
        shown = ("python -m tplightning " if case.module else "train.py ") + shlex.join(args)
        record = {"part": "bad", "label": case.label, "kind": kind, "rc": rc, "secs": round(secs, 1), "nlines": len(lines), "cmd": shown,
                  "tail": [line[:400] for line in lines[-6:]], "new": case.new, "ok": case.ok}  # fmt: skip
        append_record(out, RECORD_KIND, record)
        print(f"[bad {n}/{len(cases)}] {kind:14s} rc={rc} {secs:5.1f}s  {case.label}", flush=True)
        shutil.rmtree(cwd, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- crash and resume
@dataclass
class Chain:
    kills: list = field(default_factory=list)
    resumes: int = 0
    restarts: int = 0


def _ckpt_folders(run: Path) -> list[Path]:
    return sorted(run.glob("runs/*/version_*/checkpoints"))


def _temp_files(run: Path) -> int:
    return sum(1 for folder in _ckpt_folders(run) for p in folder.iterdir() if TMP_MARK in p.name)


def _check_checkpoints(run: Path) -> tuple[int, int]:
    """``(zero-byte, unreadable)`` among the ``*.ckpt`` files of ``run`` (read by :func:`tplightning.checkpoints.read`,
    which verifies the content digest)."""
    from tplightning.checkpoints import read

    zero = corrupt = 0
    for folder in _ckpt_folders(run):
        for path in folder.glob("*.ckpt"):
            if path.stat().st_size == 0:
                zero += 1
                continue
            try:
                read(path)
            except ValueError:  # ConfigError: truncated, not a checkpoint, digest mismatch
                corrupt += 1
    return zero, corrupt


def _newest_last(run: Path) -> Path | None:
    found = sorted(run.glob("runs/*/version_*/checkpoints/last.ckpt"), key=lambda p: (p.stat().st_mtime_ns, str(p)))
    return found[-1] if found else None


def _final_state(run: Path):
    """The newest last.ckpt's weights and the last test metrics of its run folder."""
    import torch

    last = _newest_last(run)
    state = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    rows = (last.parent.parent / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    test = [dict(zip(header, r.split(","))) for r in rows[1:]]
    test = [{k: v for k, v in r.items() if k.startswith("test/") and v != ""} for r in test]
    test = [r for r in test if r]
    return state, (test[-1] if test else {})


#: seconds each ``os.fsync`` of a run to be killed waits first (a slow disk)
SLOW_FSYNC = 0.2
_SLOW_DISK = ("import os, runpy, sys, time; fsync = os.fsync; os.fsync = lambda fd: (time.sleep({delay}), fsync(fd))[1]; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip

#: the line Lightning prints once the trainer is built; the kill times count from it (the imports before it take
#: most of a short run's time and write nothing)
STARTED = "TPU available"


class Watched:
    """A training process whose output is read by a thread, noting when :data:`STARTED` appears."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", start_new_session=True)  # fmt: skip
        self.launched, self.started, self.lines = time.monotonic(), None, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.started is None and STARTED in line:
                self.started = time.monotonic()

    def wait(self) -> int:
        rc = self.proc.wait()
        self.reader.join()
        return rc

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait()


def _kill_at(w: Watched, run: Path, when: float, during_save: bool) -> tuple[bool, bool, float]:
    """SIGKILL ``w`` ``when`` seconds after its trainer started or, with ``during_save``, at the first moment after
    ``when`` that a temporary checkpoint file exists (a run that ends first is not killed); ``(killed, a temporary
    file existed at the kill, seconds since the trainer started)``."""
    while w.proc.poll() is None:
        now = time.monotonic() - w.started if w.started is not None else -1.0
        if now >= when:
            saving = _temp_files(run) > 0
            if saving or not during_save:
                w.kill()
                return True, saving, now
        time.sleep(0.001 if during_save and now >= when else 0.01)
    w.wait()
    return False, False, time.monotonic() - (w.started or w.launched)


def run_crash(out: Path, work: Path, configs: list[str], epochs: int, kills: int, per_chain: int, seed: int) -> None:
    import torch

    rng = random.Random(seed)
    done = {(r["config"], r["chain"]) for r in _records(out, "crash") if r["epochs"] == epochs}
    shm = Path("/dev/shm")
    for config in configs:
        args = ["--config", config, "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false"]
        base = [sys.executable, str(ROOT / "train.py"), *args]
        # the runs to be killed write to a slow disk: each fsync waits SLOW_FSYNC seconds first, which holds a
        # checkpoint's temporary file in place long enough for a kill to land during the save
        slow = [sys.executable, "-c", _SLOW_DISK.format(delay=SLOW_FSYNC), str(ROOT / "train.py"), *args]
        stem = config.removesuffix(".yaml").replace("/", "-")
        chains = [k for k in range(-(-kills // per_chain)) if (config, k) not in done]
        if not chains:
            continue
        ref = work / f"ref-{stem}-{epochs}"
        if _newest_last(ref) is None or not (ref / "span").is_file():
            shutil.rmtree(ref, ignore_errors=True)
            ref.mkdir(parents=True)
            w = Watched(base, ref, _env())
            if w.wait() != 0 or w.started is None:
                raise SystemExit(f"the uninterrupted run of {config} failed:\n{''.join(w.lines)[-3000:]}")
            (ref / "span").write_text(str(time.monotonic() - w.started))
        span = float((ref / "span").read_text())
        ref_state, ref_test = _final_state(ref)
        print(f"[crash {config}] uninterrupted run: {span:.1f}s from the trainer's start, test {ref_test}", flush=True)
        for k in chains:
            n_kills = min(per_chain, kills - k * per_chain)
            run = work / f"chain-{stem}-{epochs}-{k}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            tmpdir = Path(tempfile.mkdtemp(prefix="fault-tmp-", dir=shm if shm.is_dir() else None))
            env = _env(TMPDIR=str(tmpdir))
            chain = Chain()
            for j in range(n_kills + 1):
                resume = _newest_last(run) is not None
                chain.resumes += resume
                chain.restarts += j > 0 and not resume
                w = Watched([*(base if j == n_kills else slow), *(["--ckpt_path", "last"] if resume else [])], run, env)
                if j == n_kills:  # the final resume runs to the end
                    if w.wait() != 0:
                        raise SystemExit(f"{config} chain {k}: the final run failed ({w.proc.returncode}):\n{''.join(w.lines)[-3000:]}")
                    break
                during_save = (k + j) % 2 == 1
                when = rng.uniform(0.0, 0.7 if during_save else 1.0) * span
                killed, saving, t = _kill_at(w, run, when, during_save)
                zero, corrupt = _check_checkpoints(run)
                chain.kills.append({"killed": killed, "aimed_at_save": during_save, "during_save": saving, "t": round(t, 2),
                                    "zero_byte": zero, "corrupt": corrupt, "tmp_left": _temp_files(run)})  # fmt: skip
            state, test = _final_state(run)
            same_w = state.keys() == ref_state.keys() and all(torch.equal(state[n], ref_state[n]) for n in state)
            leftover = sum(1 for _ in tmpdir.rglob("*"))
            record = {"part": "crash", "config": config, "chain": k, "epochs": epochs, "kills": chain.kills, "resumes": chain.resumes,
                      "restarts": chain.restarts, "identical_weights": bool(same_w), "identical_metrics": test == ref_test,
                      "tmp_left_end": _temp_files(run), "tmpdir_left": leftover, "tmpdir": str(tmpdir)}  # fmt: skip
            append_record(out, RECORD_KIND, record)
            print(f"[crash {config} chain {k}] kills {[(x['t'], x['during_save']) for x in chain.kills]} resumes "
                  f"{chain.resumes} restarts {chain.restarts} identical weights {same_w} metrics {test == ref_test}", flush=True)  # fmt: skip
            shutil.rmtree(tmpdir, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- counts
def counts(out: Path) -> dict:
    """``{"COUNTS": ..., "COUNTS_NEW": ..., "CRASH": ...}`` from every record of ``out``."""
    bad = _records(out, "bad")
    result = {}
    for key, new in (("COUNTS", False), ("COUNTS_NEW", True)):
        rows = [r for r in bad if r["new"] == new]
        result[key] = {"tried": len(rows), **{k: sum(r["kind"] == k for r in rows) for k in KINDS}}
    crash = _records(out, "crash")
    kills = [x for r in crash for x in r["kills"] if x["killed"]]  # an attempt misses when the run ends first
    result["CRASH"] = {
        "configs": sorted({r["config"] for r in crash}), "epochs": sorted({r["epochs"] for r in crash}), "chains": len(crash),
        "kill_attempts": sum(len(r["kills"]) for r in crash), "kills": len(kills), "kills_during_save": sum(x["during_save"] for x in kills), "resumes": sum(r["resumes"] for r in crash),
        "fresh_restarts": sum(r["restarts"] for r in crash),
        "identical_finals": sum(r["identical_weights"] and r["identical_metrics"] for r in crash),
        "zero_byte_ckpts": sum(x["zero_byte"] for x in kills), "corrupt_ckpts": sum(x["corrupt"] for x in kills),
        "tmp_left_after_kill": sum(x["tmp_left"] for x in kills), "tmp_left_end": sum(r["tmp_left_end"] for r in crash),
        "tmpdir_files_left": sum(r["tmpdir_left"] for r in crash),
    }  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["bad", "crash", "all"], default="all")
    p.add_argument("--out", type=Path, required=True, help="record file (JSONL), appended per finished case; reruns resume")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder, removed at the end)")
    p.add_argument("--configs", nargs="+", default=["dtp.yaml", "lee_dtp.yaml", "tp_ei_woodbury.yaml"])
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs per config")
    p.add_argument("--kills-per-chain", type=int, default=2, help="kills before the final resume of a chain")
    p.add_argument("--epochs", type=int, default=3, help="--trainer.max_epochs of the crash runs (the configs' own are longer)")
    p.add_argument("--timeout", type=float, default=120, help="seconds before a bad invocation counts as a hang")
    p.add_argument("--only", type=int, help="the first N bad invocations only")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="fault-round-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if a.part in ("bad", "all"):
            run_bad(a.out, work, a.timeout, a.only)
        if a.part in ("crash", "all"):
            print(f"crash part: {a.configs}, --trainer.max_epochs {a.epochs} (shortened), {a.kills} kills per config, "
                  f"{a.kills_per_chain} per chain", flush=True)  # fmt: skip
            run_crash(a.out, work, a.configs, a.epochs, a.kills, a.kills_per_chain, a.seed)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = counts(a.out)
    for key, value in result.items():
        print(key, json.dumps(value))
    return result


if __name__ == "__main__":
    main()
