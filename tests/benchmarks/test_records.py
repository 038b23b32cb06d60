"""Run records that cannot lose data (issue 28, findings 1 and 2): the tables of docs/RESULTS.md are rendered from
checksummed record files under docs/data/, a bad line costs that record only (named, never a traceback), a torn last
line does not swallow the next record, and two machines' record files merge by concatenation."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import common, mnist, student_teacher as st, tune

from conftest import REPO

DOCS = REPO / "docs"
TINY = ["--epochs", "1", "--seeds", "2", "--jobs", "1", "--num-train", "64"]


def _docs_copy(tmp_path: Path) -> Path:
    """A copy of docs/RESULTS.md with its record files (docs/data/*.jsonl) beside it; returns the copy's RESULTS.md."""
    (tmp_path / "data").mkdir()
    for f in (DOCS / "data").glob("*.jsonl"):
        shutil.copy(f, tmp_path / "data" / f.name)
    shutil.copy(DOCS / "RESULTS.md", tmp_path / "RESULTS.md")
    return tmp_path / "RESULTS.md"


def _stray_character(path: Path, marker: str) -> None:
    """Put a stray character into the middle of the last line of the ``marker`` block (where the block's records
    were kept as an HTML comment before they moved to docs/data)."""
    text = path.read_text()
    end = text.index(f"\n<!-- {marker}:end -->")
    start = text.rindex("\n", 0, end) + 1
    middle = (start + end) // 2
    path.write_text(text[:middle] + "x" + text[middle:])


# --------------------------------------------------------------------------------------------- finding 1
def test_results_md_holds_no_records_and_its_tables_regenerate_from_the_data_files(tmp_path):
    text = (DOCS / "RESULTS.md").read_text()
    assert ":runs [" not in text
    out = _docs_copy(tmp_path)
    mnist.main(["--seeds", "0", "1", "2", "3", "4", "--out", str(out)])  # every run recorded: trains nothing
    for name in ("equal", "contracting", "deep"):  # every invocation of student_teacher trains: render from records
        runs = st.read_records(out, name)
        shown = [r for r in st.TABLES[name].rules if r.name in {x["rule"] for x in runs}]
        common.write_block(out, f"student_teacher:{name}", st.render(st.TABLES[name], shown, runs))
    tune.write_checks([], out)
    assert out.read_text() == text
    assert {f.name: f.read_bytes() for f in (tmp_path / "data").iterdir()} == {
        f.name: f.read_bytes() for f in (DOCS / "data").glob("*.jsonl")}  # nothing was appended: no row changed


def test_a_stray_character_in_results_md_drops_no_mnist_rows(tmp_path):
    out = _docs_copy(tmp_path)
    before = common.read_block(out, "mnist")
    _stray_character(out, "mnist")
    mnist.main(["--rules", "BP", "--seeds", "0", "1", "2", "3", "4", "--out", str(out)])  # recorded: trains nothing
    assert common.read_block(out, "mnist") == before  # all 26 rules' rows, not BP's alone
    assert len([line for line in before.splitlines() if line.startswith("| ") and "`configs/mnist/" in line]) == 26


def test_a_stray_character_in_results_md_drops_no_student_teacher_rows(tmp_path):
    out = tmp_path / "RESULTS.md"
    st.main(["--table", "equal", "--rules", "BP", *TINY, "--out", str(out)])
    _stray_character(out, "student_teacher:equal")
    st.main(["--table", "equal", "--rules", "DRL", *TINY, "--seeds", "1", "--out", str(out)])
    rows = [line.split(" | ")[0] for line in out.read_text().splitlines() if line.startswith("| ") and "yaml" in line]
    assert sorted(rows) == ["| BP", "| DRL"]


# --------------------------------------------------------------------------------------------- finding 2
def _runs(rule: str = "BP", seeds=(0, 1)) -> list[dict]:
    """Recorded MNIST runs of ``rule`` (their records in docs/data/mnist_runs.jsonl), by seed."""
    runs = mnist.read_runs(DOCS / "data" / "mnist_runs.jsonl")
    keys = {mnist.run_key(rule, mnist.RULES[rule].config, s, None, ()): s for s in seeds}
    return [runs[k] for k in sorted(keys, key=keys.get)]


def _dry_run(tmp_path: Path, record: Path, capsys) -> tuple[str, str]:
    mnist.main(["--rules", "BP", "--seeds", "0", "1", "--dry-run", "--record", str(record), "--out", str(tmp_path / "R.md")])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_a_torn_last_line_is_named_skipped_and_the_next_record_starts_its_own_line(tmp_path, capsys):
    record = tmp_path / "runs.jsonl"
    seed0, seed1 = _runs()
    line1 = common.record_line(mnist.RUN_KIND, seed1, None)
    record.write_text(common.record_line(mnist.RUN_KIND, seed0, None) + "\n" + line1[: len(line1) // 2])  # killed mid-write
    out, err = _dry_run(tmp_path, record, capsys)
    assert f"warning: {record} line 2: not JSON" in err and "without its newline" in err
    # the torn run is not taken as done: the campaign trains it again (here a dry run, which lists it)
    assert "BP seed 0: recorded" in out and "BP seed 1: python train.py" in out and "1 runs to do, 1 recorded" in out
    mnist.record_run(record, seed1, seed1["machine"])  # the rerun's record, not glued onto the torn line
    lines = record.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == line1[: len(line1) // 2] and json.loads(lines[2])["record"]["seed"] == 1
    assert sorted(r["seed"] for r in mnist.read_runs(record).values()) == [0, 1]
    assert "line 2" in capsys.readouterr().err  # still named, still skipped


def _enveloped(record) -> str:
    """A line with a valid checksum around ``record`` (a writer with a bug, or a hand-made line)."""
    return common.record_line(common.Kind("mnist-run", {}), record, None)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("{}", "not a checksummed record line"),
        ("[]", "not a checksummed record line"),
        ("null", "not a checksummed record line"),
        ("{\"key\": \"torn", "not JSON"),
        (lambda r: _enveloped({}), "not a mnist-run record: no field 'key'"),
        (lambda r: _enveloped([]), "not a mnist-run record: a list, not an object"),
        (lambda r: _enveloped(None), "not a mnist-run record: null, not an object"),
        (lambda r: _enveloped({**r, "test_error": "1.6"}), "field 'test_error' is str, not number|null"),
        (lambda r: _enveloped({**r, "val_acc": [0.9, "x"]}), "'val_acc' holds a value that is not a number"),
        (lambda r: json.dumps(r), "not a checksummed record line"),  # the format before checksums
        (lambda r: common.record_line(mnist.RUN_KIND, r, None).replace(str(r["test_error"]), "0.5"), "checksum mismatch"),
        (lambda r: common.record_line(tune.CHECK_KIND, {}, None), "a record of kind 'check', not 'mnist-run'"),
    ],
    ids=["{}", "[]", "null", "torn", "env-{}", "env-[]", "env-null", "string-test_error", "string-in-curve", "unchecked",
         "edited-value", "other-kind"],
)  # fmt: skip
def test_a_malformed_record_is_skipped_and_named_without_a_traceback(tmp_path, capsys, bad, why):
    record = tmp_path / "runs.jsonl"
    seed0, seed1 = _runs()
    bad_line = bad if isinstance(bad, str) else bad(seed1)
    record.write_text(common.record_line(mnist.RUN_KIND, seed0, None) + "\n" + bad_line + "\n")
    out, err = _dry_run(tmp_path, record, capsys)
    assert err.startswith(f"warning: {record} line 2: ") and why in err and err.endswith("; skipped\n"), err
    assert "BP seed 0: recorded" in out and "BP seed 1: python train.py" in out  # the bad record's run is to do again


def test_the_writer_fsyncs_each_record_and_refuses_a_malformed_one(tmp_path, monkeypatch):
    synced = []
    real = common.os.fsync
    monkeypatch.setattr(common.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    record = tmp_path / "sub" / "runs.jsonl"
    seed0, seed1 = _runs()
    mnist.record_run(record, seed0, "m")
    mnist.record_run(record, seed1, "m")
    assert len(synced) == 3  # each record, and the folder of the new file once
    with pytest.raises(ValueError, match="not a mnist-run record for .*: field 'test_error' is str"):
        common.append_record(record, mnist.RUN_KIND, {**seed0, "test_error": "1.6"})  # our bug: a traceback
    assert len(record.read_text().splitlines()) == 2


# --------------------------------------------------------------------------------------------- merging
def test_two_machines_records_merge_by_concatenation(tmp_path):
    seed0, seed1, seed2 = _runs(seeds=(0, 1, 2))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common.append_record(a, mnist.RUN_KIND, seed0, "2026-12-05T10:00:00.000000Z")
    common.append_record(a, mnist.RUN_KIND, seed1, "2026-12-05T11:00:00.000000Z")
    rerun = {**seed1, "seconds": 1.0, "machine": "machine B"}  # seed 1 again on B, later (--rerun)
    common.append_record(b, mnist.RUN_KIND, rerun, "2026-12-06T09:00:00.000000Z")
    common.append_record(b, mnist.RUN_KIND, seed2, "2026-12-06T10:00:00.000000Z")
    common.append_record(b, mnist.RUN_KIND, seed0, None)  # a converted copy of seed 0: older than any stamp
    merged = []
    for first, second in ((a, b), (b, a)):
        both = tmp_path / f"{first.stem}{second.stem}.jsonl"
        both.write_bytes(first.read_bytes() + second.read_bytes())  # cat first second
        merged.append(mnist.read_runs(both))
    for runs in merged:  # the union; of the two records of seed 1 the later written, in either order
        assert sorted(r["seed"] for r in runs.values()) == [0, 1, 2]
        assert [r["machine"] for r in runs.values() if r["seed"] == 1] == ["machine B"]
        assert [r for r in runs.values() if r["seed"] == 0] == [seed0]
    assert {k: merged[0][k] for k in sorted(merged[0])} == {k: merged[1][k] for k in sorted(merged[1])}
    # equal stamps (a file concatenated with one that holds a copy of it): the larger checksum wins, in either order
    c, d = tmp_path / "c.jsonl", tmp_path / "d.jsonl"
    common.append_record(c, mnist.RUN_KIND, seed0, "2026-12-05T10:00:00.000000Z")
    common.append_record(d, mnist.RUN_KIND, {**seed0, "machine": "other"}, "2026-12-05T10:00:00.000000Z")
    cd, dc = (common.read_records(tmp_path / n, mnist.RUN_KIND) for n in ("c.jsonl", "d.jsonl"))
    assert common.newest([*cd, *dc], key=lambda r: r["key"]) == common.newest([*dc, *cd], key=lambda r: r["key"])


def test_two_machines_table_rows_merge_by_concatenation(tmp_path):
    """Each machine ran some rules into its own docs: the concatenated row files give the table of all rules."""
    rows = {rec["rule"]: rec for rec in mnist.read_records(DOCS / "RESULTS.md")}
    for name, rules in (("a", ["BP", "DTPAI"]), ("b", ["FA", "DFA"])):
        for rule in rules:
            common.append_record(tmp_path / name / "data" / mnist.ROWS, mnist.ROW_KIND, rows[rule])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / mnist.ROWS).write_bytes(b"".join((tmp_path / n / "data" / mnist.ROWS).read_bytes() for n in "ab"))
    assert [rec["rule"] for rec in mnist.read_records(tmp_path / "RESULTS.md")] == ["BP", "DTPAI", "FA", "DFA"]
