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
    assert f"| {mnist['DTPAI']['ratio_step']:.2f} |" in text
    rows = [line for line in text.splitlines() if line.startswith("| TPEI |")]
    assert len(rows) == 2  # one per batch size, with an exponent in the last cell
    assert all(math.isfinite(float(row.rstrip(" |").rsplit("|", 1)[1])) for row in rows)
    assert "re-inverting W each step" in text
    assert "<!-- speed:cnn:cpu:start -->" in text and {r["rule"] for r in res["cnn"]} == set(speed.CNN_RULES)
    assert "Conv2d(input_shape [1, 28, 28]" in text


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


def test_paired_ratios_cancel_a_drifting_machine(monkeypatch):
    # the host slows down round after round; BP and the rule timed back to back share each round's speed
    calls = []

    def fake_measure(name, sizes, batch, steps, warmup, device, classification, network=None):
        calls.append(name)
        speed_of_round = 1.0 + (len(calls) - 1) // 5  # per round: BP alone, then the pairs BP+DTPAI, BP+OriginalTP
        base = {"BP": 10.0, "DTPAI": 15.0, "OriginalTP": 22.0}[name]
        t = base * speed_of_round * 1e-3
        return {"rule": name, "sizes": sizes, "batch": batch, "batch_s": 1.1 * t, "step_s": t, "steps": steps, "memory": 0}

    monkeypatch.setattr(speed, "measure", fake_measure)
    args = speed.parse_args(["--steps", "3", "--warmup", "1"])
    rows = {r["rule"]: r for r in speed.paired_with_bp(3, ["BP", "DTPAI", "OriginalTP"], [4, 4], 2, args, None)}
    assert rows["DTPAI"]["ratio_step"] == pytest.approx(1.5) and rows["OriginalTP"]["ratio_batch"] == pytest.approx(2.2)
    assert rows["BP"]["ratio_step"] == 1.0
    # best-of-rounds figures taken at different moments would not: BP's best (round 0) against the rules' medians
    assert rows["OriginalTP"]["step_s"] / min(1e-2 * k for k in (1, 2, 3)) != pytest.approx(2.2)
