"""The student-teacher benchmark: seeds reach every random source, MSEs are the test loop's, tables land between markers."""
from __future__ import annotations

import json

import pytest
import torch

from tplightning import InitNearTeacher
from benchmarks import student_teacher as st

TINY = ["--epochs", "1", "--seeds", "2", "--jobs", "1", "--num-train", "64"]


def test_main_replaces_only_its_block(tmp_path):
    out = tmp_path / "RESULTS.md"
    start, end = "<!-- student_teacher:equal:start -->", "<!-- student_teacher:equal:end -->"
    out.write_text(f"# Results\n\nIntro kept.\n\n{start}\nOLD TABLE\n{end}\n\nTrailing text kept.\n")
    results = st.main(["--table", "equal", "--rules", "BP", "BPFixed", *TINY, "--out", str(out), "--json", str(tmp_path / "r.json")])

    text = out.read_text()
    assert text.startswith("# Results\n\nIntro kept.\n\n" + start) and text.endswith(end + "\n\nTrailing text kept.\n")
    assert "OLD TABLE" not in text and text.count(start) == 1 and text.count(end) == 1
    block = text[text.index(start) : text.index(end)]
    rows = [line for line in block.splitlines() if line.startswith("| BP")]
    assert sorted(row.split(" | ")[0] for row in rows) == ["| BP", "| BPFixed"]
    assert all(row.count("±") == 2 and row.endswith("| 0/2 |") for row in rows)
    assert "fig" in block and "--table equal" in block and "--num-train 64" in block and "torch " in block
    assert "batch 32, 2 batches per epoch, 1 epochs, seeds 0, 1" in block
    assert len(json.loads((tmp_path / "r.json").read_text())) == len(results["equal"]) == 4
    # rows sorted by mean test MSE
    means = [float(row.split(" | ")[3].split(" ± ")[0]) for row in rows]
    assert means == sorted(means)

    # a second table is appended, the first block left as it was
    st.main(["--table", "deep", "--rules", "BPFixed", *TINY, "--seeds", "1", "--out", str(out)])
    text2 = out.read_text()
    assert text2.startswith(text.rstrip("\n")) and "<!-- student_teacher:deep:start -->" in text2
    assert text2.rstrip().endswith("<!-- student_teacher:deep:end -->")


def test_a_run_of_some_rules_keeps_the_other_rows(tmp_path):
    """Like the MNIST table: the runs are kept in the record file beside ``--out``, so ``--rules DRL`` adds DRL's row and
    keeps BP's."""
    out = tmp_path / "RESULTS.md"
    st.main(["--table", "equal", "--rules", "BP", *TINY, "--out", str(out)])
    first = st.read_records(out, "equal")
    assert [r["rule"] for r in first] == ["BP", "BP"] and all(r["epochs"] == 1 for r in first)
    st.main(["--table", "equal", "--rules", "DRL", *TINY, "--seeds", "1", "--out", str(out)])
    st.main(["--table", "equal", "--rules", "DRL", *TINY, "--seeds", "1", "--out", str(out)])  # replaces DRL's row, once
    text = out.read_text()
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "yaml" in line]
    assert sorted(rows) == ["| BP", "| DRL"]
    records = st.read_records(out, "equal")
    assert [r["rule"] for r in records].count("DRL") == 1 and [r for r in records if r["rule"] == "BP"] == first
    assert "Commands (the rows keep the invocation that ran them)" in text and "--rules DRL" in text and "--rules BP" in text
    assert "seeds 0, 1;" in text  # the kept BP runs have seeds 0 and 1, DRL seed 0


def test_run_one_seeds_overrides_and_scores():
    overrides = (
        "--trainer.max_epochs", "1", "--data.init_args.num_train", "64",
        "--model.init_args.sizes", "[6, 6, 4]", "--data.init_args.sizes", "[6, 6, 4]",
        "--model.init_args.forward_optimizer.init_args.lr", "0.05",
    )  # fmt: skip
    r = st.run_one("rtp_ai.yaml", 3, overrides, keep=True)
    cli = r["cli"]
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    # every seed took the run's seed; the config's ModelCheckpoint is gone
    callbacks = [c for c in trainer.callbacks if type(c).__module__.startswith("tplightning")]
    assert [(type(c), c.seed, c.distance) for c in callbacks] == [(InitNearTeacher, 3, 8.0)]
    assert not any(type(c).__name__ == "ModelCheckpoint" for c in trainer.callbacks)
    assert (model.layer_seed, model.feedback_seed, dm.hparams.teacher_seed, dm.shuffle_seed) == (3, 3, 3, 3)
    assert model.net.sizes == [6, 6, 4] and dm.output_dim == 4 and len(dm.train_data) == 64
    assert model.optimizer_list()[0].param_groups[0]["initial_lr"] == pytest.approx(0.05)
    assert trainer.max_epochs == 1 and trainer.logger is None and not r["diverged"]

    # train MSE from an independent forward pass (leaky-ReLU 0.35 hidden, linear output)
    def forward(x):
        W1, W2 = (W.detach() for W in model.forward_weights)
        a = x @ W1.T
        return torch.where(a >= 0, a, 0.35 * a) @ W2.T

    x, y = dm.train_data.x, dm.train_data.y
    assert r["train_mse"] == pytest.approx(float(((forward(x) - y) ** 2).mean()), rel=1e-5)
    # test MSE: what Lightning's test loop reports as test/mse for the same weights
    (metrics,) = trainer.test(model, datamodule=dm, verbose=False)
    assert r["test_mse"] == pytest.approx(metrics["test/mse"], rel=1e-5)
    assert r["train_mse"] != pytest.approx(r["test_mse"])


def test_divergence_is_counted_and_excluded():
    r = st.run_one("bp.yaml", 0, ("--trainer.max_epochs", "1", "--data.init_args.num_train", "64",
                                  "--model.init_args.forward_optimizer.init_args.lr", "1e30"))  # fmt: skip
    assert r["diverged"] and r["test_mse"] is None and "diverged" in r["error"]

    table = st.TABLES["equal"]
    rules = [rule for rule in table.rules if rule.name in ("BP", "BPFixed")]
    same = {"seconds": 30.0, "epochs": 3, "command": "c", "date": "2026-12-01", "machine": "m", "jobs": 1}
    runs = [
        {"rule": "BP", "seed": 0, "diverged": False, "train_mse": 0.4, "test_mse": 0.5, **same},
        {"rule": "BP", "seed": 1, "diverged": False, "train_mse": 0.6, "test_mse": 0.7, **same},
        {"rule": "BPFixed", "seed": 0, "diverged": True, "train_mse": None, "test_mse": None, **same},
        {"rule": "BPFixed", "seed": 1, "diverged": False, "train_mse": 0.1, "test_mse": 0.2, **same},
    ]
    text = st.render(table, rules, runs)
    assert "Run 2026-12-01 on m; 4 runs, 2.0 min of run time in total (jobs 1)." in text  # all from the records
    rows = [line for line in text.splitlines() if line.startswith("| BP")]
    assert rows == [
        "| BPFixed | `bp_fixed.yaml` | 0.1 ± n/a | 0.2 ± n/a | 1/2 |",
        "| BP | `bp.yaml` | 0.5 ± 0.14 | 0.6 ± 0.14 | 0/2 |",
    ]
