"""Helpers shared by the benchmark commands: the RESULTS.md block writer and the machine line."""
from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

import pytorch_lightning as pl
import torch

__all__ = ["HEADER", "write_block", "machine"]

HEADER = (
    "# Results\n\nTables written by the benchmarks in `tplightning/benchmarks/`; each sits between "
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


def machine(device: torch.device | None = None) -> str:
    """One line naming the date, machine, device and library versions of a measurement."""
    if device is not None and device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return (
        f"{date.today().isoformat()}, {platform.platform()}, {where}; torch {torch.__version__}, "
        f"pytorch-lightning {pl.__version__}"
    )
