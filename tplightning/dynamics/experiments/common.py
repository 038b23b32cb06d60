"""Helpers of the chapter-6 experiments: CLI (the chapter-5 one plus ``--docs``), docs output, random networks."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ...benchmarks.common import write_block
from ...experiments.common import parse_args as _parse_args

REPO = Path(__file__).resolve().parents[3]
DOCS = REPO / "docs" / "experiments.md"
FIGURES = REPO / "docs" / "figures"
DTYPE = torch.float64


def parse_args(name: str, description: str, argv: Sequence[str] | None, sizes=None, extra=None, flags: Sequence[str] = ()):
    """:func:`tplightning.experiments.common.parse_args` plus the flag ``--docs`` (also write the figure
    to docs/figures/ and the table into docs/experiments.md) and the boolean ``flags`` (``--name``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {f: f"--{f}" in argv for f in ("docs", *(flags or ()))}
    rest = [a for a in argv if a.lstrip("-") not in flags or not a.startswith("--")]
    args = _parse_args(name, description + " (add --docs to update docs/)", rest, sizes, extra)
    for f, on in flags.items():
        setattr(args, f, on)
    return args


def to_docs(args, name: str, figure: Path, table: str) -> None:
    """With ``--docs``: copy ``figure`` to docs/figures/ and put ``table`` in docs/experiments.md."""
    if not args.docs:
        return
    FIGURES.mkdir(parents=True, exist_ok=True)
    shutil.copy(figure, FIGURES / figure.name)
    write_block(DOCS, name, table)


def orthogonal_network(L: int, n: int, scale: float, gen: torch.Generator) -> list[Tensor]:
    """``L`` random ``n x n`` orthogonal matrices times ``scale`` (well-conditioned square layers)."""
    return [torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))[0] * scale for _ in range(L)]


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def findings_line(findings: dict[str, bool]) -> str:
    """``Findings: holds: ...; does not hold: ...`` for the docs blocks."""
    return "Findings: " + "; ".join(f"{'holds' if ok else 'does not hold'}: {t}" for t, ok in findings.items()) + "."
