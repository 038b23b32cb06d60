"""The speed benchmark runs end to end (tiny sizes) and writes ratio and exponent tables."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from conftest import REPO, SHARED_DATA
from benchmarks import mnist, speed
from benchmarks.common import write_block


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


@pytest.mark.skipif(not (SHARED_DATA / "MNIST").is_dir(), reason=f"MNIST files not found under {SHARED_DATA}")
def test_trainer_part_writes_a_table_of_epochs_through_train_py(tmp_path, one_thread):
    out = tmp_path / "RESULTS.md"
    res = speed.main(["--part", "trainer", "--quick", "--no-memory", "--out", str(out)])["trainer"]
    text = out.read_text()
    assert "<!-- speed:trainer:cpu:start -->" in text and "<!-- speed:trainer:cpu:end -->" in text
    assert "--part trainer --trainer-batches 4 --skip 1 --repeats 1 --trainer-threads 1" in text
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines() if line.startswith("| ") and "thr:" not in line}
    assert set(rows) == {speed.PLAIN, "BP", "DTP-AI"}
    # GFLOP/batch, FLOPs x BP, ms/batch, x plain, x BP, epoch s, + validation s, memory, MNIST s/epoch, MNIST to 98 %
    assert all(len(cells) == 10 for cells in rows.values())
    assert rows[speed.PLAIN][-2:] == [" – ", " – "]  # no MNIST records beside this out
    # the trainer part keeps a record; --rewrite renders the block from it again
    out.write_text(out.read_text().replace("| BP |", "| stale |"))
    speed.main(["--rewrite", "--out", str(out)])
    assert "| stale |" not in out.read_text() and "| BP |" in out.read_text()
    assert float(rows[speed.PLAIN][3]) == 1.0 and float(rows["BP"][4]) == 1.0
    # one batch of BP on 784-256x5-10 (batch 128): forward 2 B n_in n_out per layer, backward twice that, less the
    # first layer's gradient with respect to the input, which nothing needs; the plain loop does the same work
    sizes, batch = [784] + [256] * 5 + [10], 128
    closed_form = 2 * batch * (3 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) - sizes[0] * sizes[1])
    (plain,) = (r for r in res[1] if r["rule"] == speed.PLAIN)
    assert plain["flops"] == closed_form and float(rows["BP"][1]) == 1.0
    assert float(rows["BP"][0]) == pytest.approx(closed_form / 1e9, abs=1e-3)
    (bp, dtp) = (next(r for r in res[1] if r["rule"] == name) for name in ("BP", "DTPAI"))
    assert all(math.isfinite(r[k]) and r[k] > 0 for r in (bp, dtp) for k in ("batch_s", "epoch_s", "tail_s", "ratio_plain"))
    assert bp["epoch_s"] == pytest.approx(bp["batch_s"] * 430)  # 55000 training images in batches of 128
    assert bp["flops"] == closed_form and dtp["ratio_flops"] > 1.5  # DTP-AI: targets and feedback training besides


def test_trainer_part_names_a_rule_without_an_mnist_config():
    with pytest.raises(SystemExit):
        speed.parse_args(["--part", "trainer", "--rules", "TPEI"])


def test_peak_memory_sees_an_allocation():
    # in a fresh process, as the benchmark measures: in this one, pages earlier tests freed but the allocator kept
    # can absorb the block without raising the resident set
    code = (
        "import math, torch\n"
        "from benchmarks import speed\n"
        "meter = speed.PeakMemory(torch.device('cpu')); meter.start()\n"
        "block = torch.ones(64 * 2**20 // 4); del block\n"
        "print('nan' if math.isnan(meter.base) else meter.peak())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout.split()[-1]
    if out == "nan":
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 * 2**20 < float(out) < 200 * 2**20


def test_step_table_times_every_mnist_rule_with_the_same_learning_rates():
    """The step table covers every fully connected rule of the MNIST benchmark, each optimizer at SGD lr 1e-4
    (BDFA's trained feedback included: left to its default it would run at SGD's 1e-3)."""
    assert {name for name in mnist.RULES if name not in mnist.CNN + mnist.LENET} <= set(speed.MNIST_RULES)
    for name in speed.MNIST_RULES:
        optimizers = speed.build(name, [12, 8, 8, 4], True).build_optimizers()
        assert optimizers and all(g["lr"] == 1e-4 for o in optimizers for g in o.param_groups), name


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (an exited one not yet reaped, state Z, does not)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_the_busy_process_ends_by_itself():
    """``--busy``'s spinner ends at its time limit while the benchmark runs, and at once when the benchmark dies
    without stopping it (killed: no ``finally`` runs)."""
    with speed.one_core_busy(True, limit_s=1.0) as spinner:
        assert _running(spinner.pid)
        assert spinner.wait(timeout=30) == 0
    code = ("import os, signal\nfrom benchmarks import speed\nwith speed.one_core_busy(True) as spinner:\n"
            "    print(spinner.pid, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n")  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    pid, deadline = int(killed.stdout.split()[-1]), time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), f"the spinner {pid} outlived its benchmark"


def test_trainer_table_shows_the_mnist_records_beside_the_measured_epoch(tmp_path):
    """The two columns come from the MNIST table's records (seconds per epoch, time to 98 %), not from the measurement."""
    out = tmp_path / "RESULTS.md"

    def run(seed, acc, spe):
        return {"seed": seed, "test_error": 2.0, "best_val_acc": 0.98, "best_epoch": 2, "epochs_run": 2, "seconds": 2 * spe,
                "seconds_per_epoch": spe, "diverged": False, "error": None, "val_acc": acc}

    for rule, runs in (("BP", [run(0, [0.97, 0.981], 5.0), run(1, [0.98, 0.99], 7.0)]), ("DTPAI", [run(0, [0.9, 0.95], 10.0)])):
        mnist.write_rows(out, [{"rule": rule, "config": "mnist/bp.yaml", "hparams": "h", "command": "c", "date": "d", "machine": "m",
                                "epochs": 2, "runs": runs}])
    timing = speed.mnist_timing(out)
    # BP: 6.0 ± 1.4 s per epoch; 98 %: seed 0 at epoch 2 (10 s), seed 1 at epoch 1 (7 s): median 8.5 s
    assert timing["BP"] == ("6.0 ± 1.4", "8 s (1.0× BP)")  # 8.5 shown to the second, rounded half to even
    assert timing["DTPAI"] == ("10.0", "not reached (0/1)")
    row = {"rule": "DTPAI", "batch_s": 0.01, "ratio_plain": 2.0, "ratio_bp": 1.5, "epoch_s": 4.3, "tail_s": 0.05, "flops": 7e8,
           "ratio_flops": 2.3, "memory": math.nan, "per_epoch": 430}
    table = speed.trainer_table({1: [row]}, torch.device("cpu"), timing)
    assert table.splitlines()[-1] == "| DTP-AI | 0.700 | 2.30 | 10 | 2.00 | 1.50 | 4.3 | 0.05 | – | 10.0 | not reached (0/1) |"
