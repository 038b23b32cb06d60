"""What the benchmark commands share: the checkout's paths, the rule description, the seeded runs, the runner, the
RESULTS.md block writer and the machine line."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import yaml

from tplightning._lightning import pl
from tplightning.config_files import CONFIG_DIR
from tplightning.rules.learned import LearnedInverseRule
from tplightning.rules.target_prop import TargetPropRule

__all__ = ["ROOT", "RESULTS", "shown", "HEADER", "Rule", "scratch_run", "config_value", "rule_class", "seed_overrides", "run_all", "quiet", "write_block", "machine"]


@dataclass(frozen=True)
class Rule:
    """A table row: ``name``, its packaged config (``tplightning/configs/``) and the forward learning rate (``None``: the config's)."""

    name: str
    config: str
    lr: float | None = None


#: the checkout's root: the benchmarks write into its docs/ and runs/ whichever folder they are started from
ROOT = Path(__file__).resolve().parents[1]
#: the Markdown file the benchmarks write their tables into (``--out``)
RESULTS = ROOT / "docs" / "RESULTS.md"


def shown(path: str | Path) -> str:
    """``path`` as the tables and messages name it: relative to the checkout's root when inside it."""
    path = Path(path)
    return path.relative_to(ROOT).as_posix() if path.is_absolute() and path.is_relative_to(ROOT) else str(path)


def _config_path(config: str | Path) -> Path:
    """The file of ``config``: a path that exists, else a packaged config name, else a path in the checkout."""
    if Path(config).exists():
        return Path(config)
    if not (CONFIG_DIR / config).exists() and (ROOT / config).exists():
        return ROOT / config
    return CONFIG_DIR / config


def cli_config(config: str | Path) -> str:
    """``config`` as ``train.py``'s ``--config`` finds it from any working folder: as given when it is a path that
    exists or a packaged config name, else its path in the checkout (e.g. ``runs/check/<name>.yaml``)."""
    return str(config) if Path(config).exists() or (CONFIG_DIR / config).exists() else str(_config_path(config))


def config_value(config: str | Path, overrides: Sequence[str], key: str):
    """The value of ``key`` (dotted) that a run of ``config`` with ``overrides`` uses (the last override wins)."""
    flag = f"--{key}"
    if flag in overrides:
        return yaml.safe_load(overrides[len(overrides) - 1 - overrides[::-1].index(flag) + 1])
    node = yaml.safe_load(_config_path(config).read_text())
    for k in key.split("."):
        node = node[k]
    return node


def rule_class(config: str | Path) -> type:
    """The rule class a config trains (``model.class_path``)."""
    module, name = config_value(config, (), "model.class_path").rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def seed_overrides(config: str | Path, seed: int) -> list[str]:
    """``train.py`` overrides that give the initial weights, the shuffling and, for target-propagation rules, the
    layer draws and the feedback noise of a run of ``config`` the seed ``seed``."""
    s, cls = str(seed), rule_class(config)
    args = ["--seed_everything", s, "--data.init_args.shuffle_seed", s]
    if issubclass(cls, TargetPropRule):
        args += ["--model.init_args.layer_seed", s]
    if issubclass(cls, LearnedInverseRule):
        args += ["--model.init_args.feedback_seed", s]
    return args


@contextlib.contextmanager
def scratch_run():
    """Run a config's ``train.py`` fit inside a temporary working folder (its loggers and checkpoints write to
    ``./runs``), with Lightning's printing swallowed; the working folder is restored after."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


def quiet() -> None:
    """Silence Lightning's info messages and warnings in a benchmark process."""
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_worker() -> None:
    torch.set_num_threads(1)
    quiet()


def run_all(fn: Callable[[tuple], dict], tasks: Sequence[tuple], jobs: int) -> Iterable[dict]:
    """``fn(task)`` for every task, yielded as they finish: in this process for ``jobs == 1``, else in a spawn pool
    of ``jobs`` workers with one torch thread each (``fn`` must be a module-level function)."""
    if jobs == 1:
        yield from map(fn, tasks)
        return
    with mp.get_context("spawn").Pool(jobs, initializer=_init_worker) as pool:
        yield from pool.imap_unordered(fn, tasks)

HEADER = (
    "# Results\n\nTables written by the benchmarks in `benchmarks/`; each sits between "
    "`<!-- ...:start -->`/`<!-- ...:end -->` markers and is rewritten by the command shown in it.\n"
)


def write_block(path: Path, marker: str, body: str) -> None:
    """Put ``body`` between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path``.

    The block is replaced where present, appended otherwise; the rest of the file is kept.
    """
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body}\n{end}"
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def records_comment(tag: str, records: Iterable[dict]) -> str:
    """``<!-- tag [records as JSON] -->``: the per-run records a table keeps inside its block, so that a later run of some
    rules can rewrite the table and keep the others' rows (read back by :func:`read_block_records`)."""
    return f"<!-- {tag} {json.dumps(list(records), separators=(',', ':'))} -->"


def read_block(path: Path, marker: str) -> str:
    """The text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path`` (empty if none)."""
    path = Path(path)
    if not path.exists():
        return ""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    m = re.search(re.escape(start) + "(.*?)" + re.escape(end), path.read_text(), re.S)
    return m.group(1) if m else ""


def read_block_records(path: Path, marker: str, tag: str) -> list[dict]:
    """The records :func:`records_comment` left under ``tag`` in the ``marker`` block of ``path`` (empty if none)."""
    m = re.search("<!-- " + re.escape(tag) + r" (.*?) -->", read_block(path, marker), re.S)
    try:
        return json.loads(m.group(1)) if m else []
    except json.JSONDecodeError:
        return []


def cpu() -> str:
    """The CPU as float32 results depend on it: its model, its cores, and the instruction set torch dispatches its CPU
    kernels to. The same seed can train differently under AVX2 and AVX512 kernels (reductions are summed in another
    order); set ``ATEN_CPU_CAPABILITY`` (``avx2``, ``avx512``, ``default``) to rerun a record on another CPU exactly."""
    model = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = names[0].strip() if names else model
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, torch kernels {torch.backends.cpu.get_cpu_capability()}"


def machine(device: torch.device | None = None, threads: bool = True) -> str:
    """One line naming the date, machine, device and library versions of a measurement (``threads``: and torch's
    current CPU threads; off where a table names its threads itself)."""
    if device is not None and device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = cpu()
        where += f", {torch.get_num_threads()} torch threads" if threads else ""
    return (
        f"{date.today().isoformat()}, {platform.platform()}, {where}; torch {torch.__version__}, "
        f"pytorch-lightning {pl.__version__}"
    )
