"""Time to accuracy (issue 31): the thresholds on hand-made records with literal expectations, and ``--val-every`` giving
validation points within the epoch on a tiny fake MNIST."""
from __future__ import annotations

import gzip
import hashlib
import math
import struct

import numpy as np
import pytest

from benchmarks import mnist as bench
from tplightning.data import mnist as mnist_data


def _run(seed, val_acc, spe, **kw):
    return {"seed": seed, "test_error": 2.0, "best_val_acc": max(val_acc), "best_epoch": 1, "epochs_run": len(val_acc),
            "seconds": spe * len(val_acc), "seconds_per_epoch": spe, "diverged": False, "error": None, "val_acc": val_acc, **kw}


def _row(rule, runs, config="mnist/bp.yaml"):
    return {"rule": rule, "config": config, "hparams": "h", "command": "c", "date": "d", "machine": "m", "epochs": 4, "runs": runs}


BP = _row("BP", [_run(0, [0.96, 0.975, 0.98, 0.984], 10.0), _run(1, [0.971, 0.979, 0.981, 0.982], 12.0),
                 _run(2, [0.95, 0.97, 0.985, 0.99], 11.0)])
SLOW = _row("FA", [_run(0, [0.9, 0.972, 0.975, 0.98], 5.0, batches_per_epoch=100),
                   _run(1, [0.9, 0.95, 0.96, 0.965], 5.0, batches_per_epoch=100),  # never reaches 97 %
                   _run(2, [0.97, 0.971, 0.972, 0.973], 6.0, batches_per_epoch=100)])


def test_curve_points_derive_seconds_and_batches_per_epoch():
    # mnist/bp.yaml: 55000 training images, batch 128: 430 batches (the last one smaller)
    assert bench.curve_points(BP["runs"][0], "mnist/bp.yaml") == [(430, 10.0, 0.96), (860, 20.0, 0.975), (1290, 30.0, 0.98), (1720, 40.0, 0.984)]
    measured = _run(0, [0.9], 1.0, val_points=[[50, 0.5, 0.8], [100, 1.1, 0.9]])
    assert bench.curve_points(measured, "mnist/bp.yaml") == [(50, 0.5, 0.8), (100, 1.1, 0.9)]
    assert bench.curve_points({**BP["runs"][0], "val_acc": None}, "mnist/bp.yaml") == []


def test_time_to_thresholds_and_censored_medians():
    rows = {r["rule"]: r for r in bench.time_to_accuracy([BP, SLOW])}
    bp = rows["BP"]["thresholds"]
    # seed 0 reaches 97 % at epoch 2 (20 s), seed 1 at epoch 1 (12 s), seed 2 at epoch 2 (22 s): median 20 s
    assert bp[0.97]["per_seed"] == {0: (860, 20.0), 1: (430, 12.0), 2: (860, 22.0)}
    assert (bp[0.97]["seconds"], bp[0.97]["batches"], bp[0.97]["reached"]) == (20.0, 860, 3)
    # 98.3 %: seed 0 at epoch 4 (40 s), seed 1 never (0.982 < 0.983), seed 2 at epoch 3 (33 s): median of (33, 40, inf) = 40
    assert bp[0.983]["per_seed"] == {0: (1720, 40.0), 1: None, 2: (1290, 33.0)}
    assert (bp[0.983]["seconds"], bp[0.983]["reached"], bp[0.983]["of"]) == (40.0, 2, 3)
    fa = rows["FA"]["thresholds"]
    # 97 %: seed 1 never; seeds 0 and 2 at 10 s and 6 s: median of (6, 10, inf) = 10, not the 8 of the reaching seeds
    assert fa[0.97]["per_seed"] == {0: (200, 10.0), 1: None, 2: (100, 6.0)}
    assert fa[0.97]["seconds"] == 10.0 and fa[0.97]["batches"] == 200
    # 98 %: only seed 0 (at 20 s): one of three reached, the median is infinite: "not reached"
    assert fa[0.98]["reached"] == 1 and math.isinf(fa[0.98]["seconds"])
    # 98 %: BP seeds at epoch 3 each: 30 s, 36 s, 33 s: median 33 s
    text = bench.render_tta(bench.time_to_accuracy([BP, SLOW]))
    assert "| FA | 4 | 10 s (0.5× BP) · 0.2k (2/3) | not reached (1/3) | not reached (0/3) |" in text
    assert "| BP | 4 | 20 s (1.0× BP) · 0.9k (3/3) | 33 s (1.0× BP) · 1.3k (3/3) | 40 s (1.0× BP) · 1.7k (2/3) |" in text
    assert "| FA | 0: 20, 1: –, 2: – |" in text


def test_a_diverged_seed_counts_as_never_reaching():
    diverged = {**_run(3, [0.5], 1.0), "diverged": True, "test_error": None, "val_acc": None}
    row = bench.time_to_accuracy([_row("DFA", [*SLOW["runs"], diverged])])[0]
    assert row["thresholds"][0.97]["per_seed"][3] is None and row["thresholds"][0.97]["of"] == 4
    assert row["thresholds"][0.97]["seconds"] == math.inf  # 2 of 4 reached: not more than half


def test_censored_median_literals():
    assert bench.censored_median([5.0, 1.0, None, 3.0]) == 4.0  # (3 + 5) / 2 with the None last
    assert bench.censored_median([None, None, 1.0, 2.0]) == math.inf
    assert bench.censored_median([7.0]) == 7.0


def _write_fake_mnist(folder, monkeypatch, n_train=600, n_test=50):
    """Fake IDX files (image i: every pixel i mod 256, label i mod 10), the md5 table patched to match."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for name, array in ((f"{split}-images-idx3-ubyte", np.broadcast_to(np.arange(n)[:, None, None] % 256, (n, 28, 28))),
                            (f"{split}-labels-idx1-ubyte", np.arange(n) % 10)):
            data = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
            monkeypatch.setitem(mnist_data.MD5, name, hashlib.md5(data).hexdigest())
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))


@pytest.mark.usefixtures("one_thread")
def test_val_every_records_points_within_the_epoch(tmp_path, monkeypatch):
    _write_fake_mnist(tmp_path / "mnist", monkeypatch)
    monkeypatch.chdir(tmp_path)  # the runs' folders
    out = tmp_path / "RESULTS.md"
    args = ["--rules", "BP", "--epochs", "2", "--subset", "600", "--num-train", "500", "--num-val", "100",
            "--data-dir", str(tmp_path / "mnist"), "--out", str(out), "--val-every", "2"]
    (r,) = bench.main(args)
    assert r["val_every"] == 2 and r["batches_per_epoch"] == 4  # 500 images, batch 128
    points = r["val_points"]
    assert [b for b, _, _ in points] == [2, 4, 6, 8]  # two validations in each of the two epochs
    assert all(0 < t1 < t2 for (_, t1, _), (_, t2, _) in zip(points, points[1:]))
    assert all(0.0 <= a <= 1.0 for _, _, a in points)
    assert r["val_acc"] == [points[1][2], points[3][2]]  # the per-epoch curve: each epoch's last validation
    (rec,) = bench.read_runs(tmp_path / "data" / "mnist_runs.jsonl").values()
    assert rec["val_points"] == points and "--trainer.val_check_interval" in rec["overrides"]
    (row,) = bench.time_to_accuracy(bench.read_records(out))
    assert row["measured"] == 1 and row["val_every"] == [2]
    text = out.read_text()
    assert "<!-- mnist-tta:start -->" in text and "measured, val every 2 batches" in text
    assert (tmp_path / "figures" / "mnist_time_to_accuracy.png").is_file()
    with pytest.raises(SystemExit):
        bench.parse_args(["--val-every", "0"])
