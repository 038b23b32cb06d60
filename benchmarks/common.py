"""What the benchmark commands share: the checkout's paths, the rule description, the seeded runs, the runner, the
RESULTS.md block writer, the run records and the machine line.

**Run records.** Every benchmark that keeps results across invocations keeps them in its own append-only record
file under ``docs/data/`` (:func:`data_file`: ``data/`` beside the Markdown file), one JSON object a line::

    {"kind": "mnist-run", "written": "2026-12-07T20:41:07.123456Z", "record": {...}, "sha256": "<64 hex digits>"}

``sha256`` is the SHA-256 of ``{"kind", "written", "record"}`` as compact JSON with sorted keys (UTF-8), so a line
changed after it was written no longer matches. ``written`` is the UTC time of the append (``null`` for records
converted from before the stamps). :func:`append_record` writes one line with a single write, then flushes and
fsyncs it; it starts on a fresh line when the file ends in a torn line. :func:`read_records` skips, and names on
stderr with the file and line number, every line that is torn, not JSON, without a checksum, of another kind,
checksum-failing, or whose record lacks a required field of its :class:`Kind` or has one of the wrong type: a bad
line costs that record, never the others, and never a traceback. Duplicates of a run key are resolved by
:func:`newest` (the latest stamp wins, then the larger checksum), independently of line order, so two machines'
records merge by concatenation. The Markdown tables are rendered from these files and hold no data of their own.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import inspect
import io
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from tplightning._lightning import pl
from tplightning.config_files import CONFIG_DIR
from tplightning.rules.learned import LearnedInverseRule
from tplightning.rules.target_prop import TargetPropRule

__all__ = ["ROOT", "RESULTS", "shown", "HEADER", "Rule", "scratch_run", "config_value", "rule_class", "seed_overrides", "run_all", "quiet", "write_block", "machine", "Kind", "Entry", "append_record", "read_records",
           "newest", "data_file"]


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
    if issubclass(cls, LearnedInverseRule) or "feedback_seed" in inspect.signature(cls).parameters:  # brSF's magnitudes too
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
    "`<!-- ...:start -->`/`<!-- ...:end -->` markers and is rewritten by the command shown in it. The tables hold no "
    "data of their own: they are rendered from the record files in `docs/data/` (`benchmarks/common.py`, \"Run records\").\n"
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


def read_block(path: Path, marker: str) -> str:
    """The text between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``path`` (empty if none)."""
    path = Path(path)
    if not path.exists():
        return ""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    m = re.search(re.escape(start) + "(.*?)" + re.escape(end), path.read_text(), re.S)
    return m.group(1) if m else ""


# --------------------------------------------------------------------------------------------- run records
#: the JSON types a field of a record may have, by the names :class:`Kind` uses
_TYPES = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "list": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def _json_type(value) -> str:
    return next((name for name in ("bool", "int", "number", "str", "null", "list", "object") if _TYPES[name](value)), type(value).__name__)


@dataclass(frozen=True)
class Kind:
    """A kind of run record: its ``name`` (written into each line, so a file of another kind is refused), its
    required ``fields`` as ``{field: "type|type"}`` with JSON type names (``str``, ``int``, ``number``, ``bool``,
    ``null``, ``list``, ``object``; other fields may be present), the fields of its run ``key`` (:func:`newest`),
    and ``check``, an optional test of nested values returning what is wrong (or None).

    >>> k = Kind("demo", {"rule": "str", "seed": "int", "mse": "number|null"}, key=("rule", "seed"))
    >>> k.problem({"rule": "BP", "seed": 0, "mse": 0.5}) is None
    True
    >>> k.problem({"rule": "BP", "seed": 0, "mse": "0.5"})
    "field 'mse' is str, not number|null"
    >>> k.problem([])
    'a list, not an object'
    """

    name: str
    fields: dict
    key: tuple = ()
    check: Callable[[dict], str | None] | None = None

    def problem(self, record) -> str | None:
        """What makes ``record`` not a record of this kind, or None."""
        if not isinstance(record, dict):
            return f"{'null' if record is None else 'a ' + _json_type(record)}, not an object"
        for field, types in self.fields.items():
            if field not in record:
                return f"no field {field!r}"
            if not any(_TYPES[t](record[field]) for t in types.split("|")):
                return f"field {field!r} is {_json_type(record[field])}, not {types}"
        return self.check(record) if self.check is not None else None

    def key_of(self, record: dict) -> str:
        """The run key of ``record``: its key fields as a JSON list."""
        return json.dumps([record[f] for f in self.key])


class Entry(NamedTuple):
    """A record read back: the record, when it was written (None for records converted from before the stamps),
    its line's checksum, and its line number."""

    record: dict
    written: str | None
    sha256: str
    line: int


def _checksum(kind: str, written: str | None, record) -> str:
    text = json.dumps({"kind": kind, "written": written, "record": record}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def record_line(kind: Kind, record: dict, written: str | None) -> str:
    """The line (without its newline) that stores ``record``: ``{"kind", "written", "record", "sha256"}``."""
    return json.dumps({"kind": kind.name, "written": written, "record": record, "sha256": _checksum(kind.name, written, record)},
                      ensure_ascii=False)  # fmt: skip


def append_record(path: str | Path, kind: Kind, record: dict, written: str | None = "now") -> None:
    """Append ``record`` to the record file ``path`` as one checksummed line, flushed and fsynced before returning.

    A file whose last line was cut off (no newline: a writer killed mid-line) first gets its newline, so the new
    record starts a line of its own and the torn one stays a single bad line. Writers of one machine are serialized
    by a lock on the file. ``written``: the stamp, ``"now"`` (UTC, to the microsecond) by default. A record that is
    not of its ``kind`` is a bug of the caller: ``ValueError``.
    """
    if (problem := kind.problem(record)) is not None:
        raise ValueError(f"not a {kind.name} record for {shown(path)}: {problem}")
    if written == "now":
        written = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = ((b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b"") + record_line(kind, record, written).encode() + b"\n")
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:  # the new file's name must survive a crash too
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _parse(raw: bytes, kind: Kind) -> tuple[Entry | None, str]:
    try:
        line = json.loads(raw.decode())
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg} at column {err.colno})"
    if not isinstance(line, dict) or not {"kind", "written", "record", "sha256"} <= line.keys():
        return None, 'not a checksummed record line ({"kind", "written", "record", "sha256"})'
    if line["kind"] != kind.name:
        return None, f"a record of kind {line['kind']!r}, not {kind.name!r}"
    if line["sha256"] != _checksum(line["kind"], line["written"], line["record"]):
        return None, "checksum mismatch: the line was changed after it was written"
    if (problem := kind.problem(line["record"])) is not None:
        return None, f"not a {kind.name} record: {problem}"
    if not (line["written"] is None or isinstance(line["written"], str)):
        return None, f"written is {_json_type(line['written'])}, not str|null"
    return Entry(line["record"], line["written"], line["sha256"], 0), ""


def read_records(path: str | Path, kind: Kind) -> list[Entry]:
    """The good records of the record file ``path`` in file order (none if there is no file).

    Every other line is skipped and named on stderr with the file and line number: a torn line (cut off by a kill),
    a line that is not JSON, not a checksummed record, of another kind, whose checksum does not match (edited by
    hand), or whose record lacks a required field or has one of the wrong type. Empty lines are passed over.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw_lines = path.read_bytes().split(b"\n")
    entries = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        entry, why = _parse(raw, kind)
        if entry is None:
            torn = " (the last line, without its newline: a write cut off)" if number == len(raw_lines) else ""
            print(f"warning: {shown(path)} line {number}: {why}{torn}; skipped", file=sys.stderr, flush=True)
            continue
        entries.append(entry._replace(line=number))
    return entries


def newest(entries: Iterable[Entry], key: Callable[[dict], object]) -> dict:
    """``{key(record): record}``, one record per key: of several records with one key, the one written last wins
    (by its ``written`` stamp; converted records, which have none, count as older than any stamp), and of records
    with the same stamp the one with the larger checksum. The choice does not depend on the order of the lines, so
    merging two machines' record files is a concatenation (``cat a.jsonl b.jsonl``) in either order. The keys keep
    the order of their first records.
    """
    best: dict = {}
    for e in entries:
        k = key(e.record)
        if k not in best or (e.written or "", e.sha256) > (best[k].written or "", best[k].sha256):
            best[k] = e
    return {k: e.record for k, e in best.items()}


def data_file(out: str | Path, name: str) -> Path:
    """The record file ``name`` of the Markdown file ``out``: ``data/<name>`` beside it (``docs/data/`` for
    ``docs/RESULTS.md``). The tables are generated from these files and hold no data of their own."""
    return Path(out).parent / "data" / name


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
