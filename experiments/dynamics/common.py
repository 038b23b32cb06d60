"""Helpers of the chapter-6 experiments: random networks; the CLI with ``--docs`` and the docs output come from
:mod:`experiments.common`."""
from __future__ import annotations

import torch
from torch import Tensor

from experiments.common import REPO, findings_line, markdown_table, parse_docs_args as parse_args, to_docs  # noqa: F401 (re-exported)

DTYPE = torch.float64


def orthogonal_network(L: int, n: int, scale: float, gen: torch.Generator) -> list[Tensor]:
    """``L`` random ``n x n`` orthogonal matrices times ``scale`` (well-conditioned square layers)."""
    return [torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))[0] * scale for _ in range(L)]
