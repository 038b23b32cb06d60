"""The speed benchmark runs end to end (tiny sizes) and writes ratio and exponent tables."""
from __future__ import annotations

import math

import pytest

from tplightning.benchmarks import speed
from tplightning.benchmarks.common import write_block


def test_speed_benchmark_writes_tables(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Results\n\nkeep me\n")
    res = speed.main(["--steps", "3", "--warmup", "1", "--widths", "8", "16", "--batches", "1", "4",
                      "--rules", "DTPAI", "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert "keep me" in text
    assert "<!-- speed:mnist:cpu:start -->" in text and "<!-- speed:exact:cpu:end -->" in text
    mnist = {r["rule"]: r for r in res["mnist"]}
    assert set(mnist) == {"BP", "DTPAI"}
    assert "| BP |" in text and "| 1.00 |" in text  # BP against itself
    ratio = mnist["DTPAI"]["step_s"] / mnist["BP"]["step_s"]
    assert f"| {ratio:.2f} |" in text
    rows = [line for line in text.splitlines() if line.startswith("| TPEI |")]
    assert len(rows) == 2  # one per batch size, with an exponent in the last cell
    assert all(math.isfinite(float(row.rstrip(" |").rsplit("|", 1)[1])) for row in rows)
    assert "re-inverting W each step" in text


def test_exponent_recovers_a_power_law():
    ns = [256, 512, 1024, 2048]
    assert speed.exponent(ns, [3e-9 * n**2 for n in ns]) == pytest.approx(2.0)
    assert speed.exponent(ns, [1e-12 * n**3 for n in ns]) == pytest.approx(3.0)


def test_write_block_replaces_only_its_block(tmp_path):
    path = tmp_path / "R.md"
    write_block(path, "a", "one")
    write_block(path, "b", "two")
    write_block(path, "a", "three")
    text = path.read_text()
    assert "three" in text and "two" in text and "one" not in text
    assert text.index("<!-- a:start -->") < text.index("<!-- b:start -->")
