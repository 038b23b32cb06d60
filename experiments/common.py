"""Helpers shared by the experiments: CLI, JSON/PNG output, batched random matrices, statistics.

All experiments compute in float64 on the CPU and draw every random number from one
``torch.Generator`` seeded by ``--seed``, so a run is reproducible.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from tplightning import functional as F

DTYPE = torch.float64
REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "experiments.md"
FIGURES = REPO / "docs" / "figures"


def parse_args(
    name: str,
    description: str,
    argv: Sequence[str] | None = None,
    sizes: dict[str, tuple[int, int, str]] | None = None,
    extra: dict[str, tuple[type, Any, str]] | None = None,
    module: str | None = None,
) -> argparse.Namespace:
    """Parse ``--out`` (default ``out/<name>`` in the checkout), ``--full``, ``--seed`` and the experiment's options; ``module`` names
    the experiment's module in the usage line (default ``experiments.<name>``).

    ``sizes`` maps an option to ``(default, full, help)``: it takes ``full`` under ``--full``
    unless given explicitly, so a test can shrink a run with e.g. ``--trials 200``. ``extra``
    maps an option to ``(type, default, help)``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module or 'experiments.' + name}", description=description)
    parser.add_argument("--out", type=Path, default=REPO / "out" / name, help="output folder (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help="use the thesis' sizes")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    for opt, (default, full, help_) in (sizes or {}).items():
        parser.add_argument(f"--{opt}", type=int, default=None, help=f"{help_} (default {default}, --full {full})")
    for opt, (type_, default, help_) in (extra or {}).items():
        parser.add_argument(f"--{opt}", type=type_, default=default, help=f"{help_} (default: %(default)s)")
    args = parser.parse_args(argv)
    for opt, (default, full, _) in (sizes or {}).items():
        key = opt.replace("-", "_")
        if getattr(args, key) is None:
            setattr(args, key, full if args.full else default)
    return args


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread inside the block (restored after).

    The experiments batch thousands of tiny LAPACK calls; with several threads (especially on a
    busy machine) the threading overhead makes them many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def save_json(out: Path, name: str, data: dict) -> Path:
    """Write ``data`` to ``out/name.json`` (creating ``out``) and return the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=_to_builtin) + "\n")
    return path


def _to_builtin(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def subplots(ncols: int, width: float = 3.6, height: float = 3.0):
    """A ``1 x ncols`` matplotlib figure on the non-interactive Agg backend; returns ``(fig, axes)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, out: Path, name: str, dpi: int = 100) -> Path:
    """Save ``fig`` as a small PNG ``out/name.png`` and close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_layer_logs(results: dict, key: str, layers: int, out: Path, name: str, ylabel: str, ylim: tuple[float, float],
                    width: float = 3.6, lw: float | None = None) -> Path:
    """One panel per layer: ``log[key][i]`` of every logged forward step, a line per rule of ``results`` (rule ->
    ``{"logs": [{"forward_step": ..., key: [...]}, ...]}``); saved as ``out/name.png``."""
    fig, axes = subplots(max(layers, 1), width=width, height=2.8)
    style = {} if lw is None else {"lw": lw}
    for i, ax in enumerate(axes):
        for rule, r in results.items():
            ax.plot([e["forward_step"] for e in r["logs"]], [e[key][i] for e in r["logs"]], label=rule, **style)
        ax.set_title(f"layer {i + 1}")
        ax.set_xlabel("forward step")
        ax.set_ylim(*ylim)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7)
    return save_figure(fig, out, name)


def robust_gaussian(
    batch: int, rows: int, cols: int, tau: float = 0.4, gen: torch.Generator | None = None, diagonal: bool = False
) -> Tensor:
    """``batch`` Gaussian ``rows x cols`` float64 matrices with ``sigma_min * sigma_max > tau`` (section 4.2.3, method 1):
    :func:`tplightning.functional.robust_invertible_gaussian` in its batched form."""
    return F.robust_invertible_gaussian(rows, tau, generator=gen, dtype=DTYPE, batch=batch, cols=cols, diagonal=diagonal)


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation coefficient of two 1-D tensors (``nan`` with fewer than 2 samples)."""
    if x.numel() < 2:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def apply_pinv(A: Tensor, b: Tensor) -> Tensor:
    """``A^+ b`` for batched ``A (..., m, n)`` and ``b (..., m)``: the min-norm least-squares solution.

    Solved by LAPACK's ``gelsy`` (complete orthogonal factorisation, CPU): much faster than forming
    ``pinv(A)`` or SVD-based ``gelsd`` for the tall, badly scaled matrices of the experiments.
    """
    return torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsy").solution.squeeze(-1)


def output_jacobians(layer_jacobians: Sequence[Tensor]) -> list[Tensor]:
    """Blocks ``J_i = dh_L/dh_i = prod_{k=L}^{i+1} J_{h_k}``, ``i = 1..L-1`` (eq. 4.43, 4.50, 5.35).

    ``layer_jacobians`` are ``J_{h_2}, ..., J_{h_L}`` (``J_{h_k} = dh_k/dh_{k-1} = D_{s_k} W_k``,
    batched ``(..., n_k, n_{k-1})``); returns ``[J_1, ..., J_{L-1}]``, ``J_i`` of shape ``(..., n_L, n_i)``.
    """
    blocks = [layer_jacobians[-1]]
    for J_h in reversed(layer_jacobians[:-1]):
        blocks.insert(0, blocks[0] @ J_h)
    return blocks


# --------------------------------------------------------------------------------------------- docs output
def parse_docs_args(name: str, description: str, argv: Sequence[str] | None, sizes=None, extra=None, flags: Sequence[str] = (),
                    module: str | None = None):
    """:func:`parse_args` plus the flag ``--docs`` (also write the figure
    to docs/figures/ and the table into docs/experiments.md) and the boolean ``flags`` (``--name``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {f: f"--{f}" in argv for f in ("docs", *(flags or ()))}
    rest = [a for a in argv if a.lstrip("-") not in flags or not a.startswith("--")]
    args = parse_args(name, description + " (add --docs to update docs/)", rest, sizes, extra, module)
    for f, on in flags.items():
        setattr(args, f, on)
    return args


def to_docs(args, name: str, figure: Path, table: str) -> None:
    """With ``--docs``: copy ``figure`` to docs/figures/ and put ``table`` in docs/experiments.md."""
    if not args.docs:
        return
    FIGURES.mkdir(parents=True, exist_ok=True)
    shutil.copy(figure, FIGURES / figure.name)
    from benchmarks.common import write_block

    write_block(DOCS, name, table)


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
