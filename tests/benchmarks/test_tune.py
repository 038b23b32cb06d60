"""The tuning command: tiny studies on 600 MNIST images and one epoch per trial (seconds each)."""
from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

optuna = pytest.importorskip("optuna")  # the ``tune`` extra; .ci/run installs it

from optuna.trial import TrialState

import tplightning as tp
import tplightning.cli
from tplightning.cli import main as train_main
from tplightning.config_files import CONFIG_DIR
from tplightning.data.mnist import MNISTDataModule, find_files
from tplightning.rules.base import DivergenceError

from benchmarks import tune

from conftest import REPO, SHARED_DATA

HAVE_MNIST = SHARED_DATA.is_dir() and all(p is not None for p in find_files(SHARED_DATA).values())
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=f"MNIST files not found under {SHARED_DATA}")
TINY = ["--epochs", "1", "--subset", "600", "--data-dir", str(SHARED_DATA), "--no-progress"]
DATA = ["--data.init_args.subset", "600", "--data.init_args.num_train", "540", "--data.init_args.num_val", "60",
        "--data.init_args.data_dir", str(SHARED_DATA)]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def load(path, name):
    return optuna.load_study(study_name=name, storage=tune.open_storage(str(path)))


def test_search_spaces_give_bp_the_forward_part_of_every_rule():
    bp, lee, fa = (tuple(p.name for p in tune.search_space(r)) for r in ("BP", "LeeDTP", "FA"))
    assert bp == fa == ("lr", "weight_decay", "init")
    assert lee == bp + ("target_stepsize", "feedback_lr", "feedback_noise_std", "feedback_iterations")
    assert tuple(p.name for p in tune.search_space("DTPAI")) == lee + ("negative_slope", "feedback_weight_decay")
    assert "init" not in {p.name for p in tune.search_space("CNN-BP")}  # its layers name their own init
    # BDFA's feedback matrices learn: its feedback learning rate is searched, as the learned-inverse rules' is
    assert tuple(p.name for p in tune.search_space("BDFA")) == bp + ("feedback_lr",)
    fb = {r: next(p for p in tune.search_space(r) if p.name == "feedback_lr") for r in ("BDFA", "LeeDTP", "LDRL")}
    assert (fb["BDFA"].low, fb["BDFA"].high) == (fb["LeeDTP"].low, fb["LeeDTP"].high) == (1e-4, 0.1)
    assert (fb["LDRL"].low, fb["LDRL"].high) == (1e-3, 3.0)  # its config's 1.0 lies inside its range
    for p in tune.search_space("DTPAI"):  # every searched key exists in, or is accepted by, the config's rule
        assert p.key.startswith("model.init_args.")


def test_unknown_rule_is_a_clear_error(capsys):
    with pytest.raises(ValueError, match=r"unknown rule 'Nope' for tuning; expected one of .*LeeDTP"):
        tune.search_space("Nope")
    with pytest.raises(SystemExit) as exc:
        tune.parse_args(["--rule", "Nope"])
    assert exc.value.code == 2 and "unknown rule 'Nope'" in capsys.readouterr().err


def untuned(text: str) -> str:
    """A config's text as before tuning: no tuning header, no ``tuned (was ...)`` marks, no feedback_iterations line."""
    lines = [tune._TUNED_NOTE.sub("", line) for line in text.splitlines() if not line.startswith(tune.TUNED_TAG)]
    return "\n".join(line for line in lines if "feedback_iterations:" not in line) + "\n"


def test_shipped_values_are_the_configs_own_clipped_into_the_search_range(tmp_path, monkeypatch):
    assert set(tune.shipped_values("BP", tune.search_space("BP"))) == {"lr", "weight_decay", "init"}
    # DDTPLinear's __init__ passes **kwargs on: the default comes from the class that names it
    assert tune._default(tp.DDTPLinear, "feedback_iterations") == 1 and tune._default(tp.LDRL, "feedback_iterations") == 20
    assert tune._default(tp.DDTPLinear, "nope") is inspect.Parameter.empty
    doc = yaml.safe_load((CONFIG_DIR / "mnist" / "dtp_ai.yaml").read_text())
    init = doc["model"]["init_args"]
    init.pop("feedback_iterations", None)
    init.update(negative_slope=0.35, feedback_weight_decay=0.0, target_stepsize=0.1, init="orthogonal")
    init["forward_optimizer"]["init_args"]["lr"] = 3e-4
    config = tmp_path / "dtp_ai.yaml"
    config.write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(tune.common, "_config_path", lambda name: config)
    values = tune.shipped_values("DTPAI", tune.search_space("DTPAI"))
    assert values["lr"] == 3e-4 and values["negative_slope"] == 0.35 and values["init"] == "orthogonal"
    assert values["target_stepsize"] == 0.1
    assert values["feedback_weight_decay"] == 1e-3  # 0 clipped into the range
    assert values["feedback_iterations"] == 1  # the config does not set it: the rule's default


def test_keep_holds_parameters_out_of_the_search(capsys):
    assert [p.name for p in tune.searched("LeeDTP", ["weight_decay", "init"])] == [
        "lr", "target_stepsize", "feedback_lr", "feedback_noise_std", "feedback_iterations"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--keep negative_slope: not searched for BP; its parameters are lr, "):
        tune.searched("BP", ["negative_slope"])
    with pytest.raises(SystemExit) as exc:
        tune.parse_args(["--rule", "BP", "--keep", "negative_slope"])
    assert exc.value.code == 2 and "--keep negative_slope: not searched for BP" in capsys.readouterr().err


@needs_mnist
def test_first_trial_is_the_shipped_config_and_kept_values_are_not_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the trials' run folders
    monkeypatch.setattr(tune, "STUDIES", tmp_path / "docs" / "data" / "tune")  # --report reads the default journals
    storage = tune.STUDIES / "LeeDTP.journal"
    study = tune.main(["--rule", "LeeDTP", "--trials", "2", "--storage", str(storage), "--keep", "weight_decay",
                       "feedback_iterations", *TINY])  # fmt: skip
    first, second = sorted(study.get_trials(), key=lambda t: t.number)
    doc = yaml.safe_load((CONFIG_DIR / "mnist" / "lee_dtp.yaml").read_text())["model"]["init_args"]
    assert first.user_attrs["shipped"] and first.params["lr"] == doc["forward_optimizer"]["init_args"]["lr"]
    assert first.params["feedback_lr"] == doc["feedback_optimizer"]["init_args"]["lr"]
    assert first.params["feedback_noise_std"] == doc["feedback_noise_std"] and first.params["init"] == doc["init"]
    assert "weight_decay" not in second.params and "feedback_iterations" not in second.params
    assert second.params["lr"] != first.params["lr"]  # the second trial is sampled
    out = tmp_path / "results.md"
    out.write_text("<!-- tuning:start -->\n| BP | an earlier row |\n| LeeDTP | an earlier row |\n<!-- tuning:end -->\n")
    tune.main(["--report", "--out", str(out)])  # a rule without a journal keeps its row; LeeDTP's is rewritten
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| rule ")]
    assert len(rows) == 2 and rows[0] == "| BP | an earlier row |" and rows[1].startswith("| LeeDTP | 1 ep")
    rows = rows[1:]
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[1] == "1 ep, 540/60 images" and cells[2] == "2 (0 pruned, 0 diverged)"
    assert cells[3] == f"{first.value:.4f}" and cells[4] == f"{max(first.value, second.value):.4f}"
    with pytest.raises(SystemExit):
        tune.parse_args(["--report", "Nope"])
    with pytest.raises(ValueError, match=r"made with epochs 1, .* parameters .*--keep"):  # another space: refused
        tune.run_study("LeeDTP", 3, str(storage), epochs=1, data=tune._data_overrides(tune.parse_args(
            ["--rule", "LeeDTP", *TINY])), keep=["weight_decay"])  # fmt: skip


@needs_mnist
def test_tiny_study_scores_validation_accuracy_and_never_tests(tmp_path, monkeypatch):
    def no_test(self):
        raise AssertionError("a tuning trial touched the test set")

    monkeypatch.setattr(MNISTDataModule, "test_dataloader", no_test)
    storage = tmp_path / "bp.journal"
    study = tune.main(["--rule", "BP", "--trials", "2", "--storage", str(storage), *TINY])
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert [t.number for t in trials] == [0, 1]
    # the objective is the run's validation accuracy: rerun trial 0's values through train.py (one epoch, so
    # the best epoch is the last) and read val/acc there
    args = ["--config", "mnist/bp.yaml", "--test_on", "none", "--trainer.max_epochs", "1", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar",
            "false", "--seed_everything", "0", "--data.init_args.shuffle_seed", "0", *DATA]  # fmt: skip
    args += tune.overrides(tune.search_space("BP"), trials[0].params)
    val = train_main(args)["fit_metrics"]["val/acc"]
    assert trials[0].value == pytest.approx(val, abs=1e-6)
    assert trials[0].intermediate_values == {0: trials[0].value}


@needs_mnist
def test_resume_continues_the_count_and_an_interrupted_trial_is_rerun(tmp_path, monkeypatch):
    storage = tmp_path / "bp.journal"
    real, calls = tplightning.cli.main, []

    def interrupt_second(args, callbacks=()):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(args, callbacks=callbacks)

    monkeypatch.setattr("tplightning.cli.main", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        tune.main(["--rule", "BP", "--trials", "3", "--storage", str(storage), *TINY])
    study = load(storage, "mnist-BP")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    monkeypatch.setattr("tplightning.cli.main", real)
    tune.main(["--rule", "BP", "--trials", "3", "--storage", str(storage), *TINY])
    study = load(storage, "mnist-BP")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [t.state for t in study.trials].count(TrialState.COMPLETE) == 3
    with pytest.raises(ValueError, match=r"was made with epochs 1, .* not epochs 2,"):  # another proxy: not the same study
        tune.main(["--rule", "BP", "--trials", "5", "--storage", str(storage), *TINY[2:], "--epochs", "2"])
    config = tmp_path / "bp.yaml"
    config.write_text((CONFIG_DIR / "mnist" / "bp.yaml").read_text())
    monkeypatch.setattr(tune.common, "_config_path", lambda name: config)
    study = tune.main(["--rule", "BP", "--trials", "3", "--storage", str(storage), "--write-config", "--no-progress"])
    assert len(study.trials) == 4  # full: ran nothing, wrote the best values
    header = config.read_text().splitlines()[0]
    assert header.startswith("# Tuned by python -m benchmarks.tune --rule BP: study mnist-BP, 3 trials")
    assert "1 epochs per trial, data --data.init_args.subset 600" in header and "; searched lr, weight_decay, init)" in header
    lr = yaml.safe_load(config.read_text())["model"]["init_args"]["forward_optimizer"]["init_args"]["lr"]
    assert lr == pytest.approx(study.best_params["lr"], rel=1e-3)


@needs_mnist
def test_two_workers_share_one_study_without_repeating_trials(tmp_path):
    storage = tmp_path / "shared.journal"
    cmd = [sys.executable, "-m", "benchmarks.tune", "--rule", "BP", "--trials", "4", "--storage",
           str(storage), "--startup", "2", *TINY]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([*cmd, "--sampler-seed", str(s)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for s in (0, 1)]  # fmt: skip
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = load(storage, "mnist-BP").trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5 and len(trials) == len(finished)  # each worker may finish the trial it runs
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == len(params)
    # 4-5 trials in all, not 8: the workers counted one study's trials. Which worker ran how many is left open: under
    # load one process may start only after the other has filled the study (it then runs none and exits 0).


@needs_mnist
def test_pruned_trial_stops_early():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.999))
    study.optimize(tune.objective("BP", epochs=3, data=DATA), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]  # stopped after epoch 1


def test_divergence_is_a_pruned_trial(monkeypatch):
    def diverge(args, callbacks=()):
        raise DivergenceError("non-finite loss at batch 3. Layer 2 went inf")

    monkeypatch.setattr("tplightning.cli.main", diverge)
    study = optuna.create_study(direction="maximize")
    study.optimize(tune.objective("LeeDTP", epochs=1), n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    assert study.trials[0].user_attrs["diverged"] == "non-finite loss at batch 3"
    assert "2 pruned (2 of them diverged)" in tune.summary(study)


def test_config_writer_updates_values_and_keeps_comments(tmp_path):
    path = tmp_path / "lee_dtp.yaml"
    original = untuned((CONFIG_DIR / "mnist" / "lee_dtp.yaml").read_text())
    path.write_text(original)
    values = {
        "model.init_args.forward_optimizer.init_args.lr": 0.000123456,  # in a flow mapping
        "model.init_args.target_stepsize": 3.5e-05,  # a block scalar (needs 3.5e-05 written with a dot for YAML 1.1)
        "model.init_args.feedback_iterations": 3,  # absent: a new line in model.init_args
        "model.init_args.init": "gaussian",
        "model.init_args.feedback_init": "pinv",  # the config's own value: not marked
    }
    tune.write_config(path, values, "# Tuned by test one")
    tune.write_config(path, values, "# Tuned by test two")  # a second write replaces the header line
    text = path.read_text()
    assert text.splitlines()[0] == "# Tuned by test two" and text.count("# Tuned by") == 1
    # every changed line says what it was before (the second write changed nothing, so the marks are the first's)
    marks = {line.split(":")[0].strip(): line.split("tuned ")[-1] for line in text.splitlines() if "tuned (" in line}
    old = yaml.safe_load(original)["model"]["init_args"]
    assert marks == {"init_args": f"(was lr {old['forward_optimizer']['init_args']['lr']})",
                     "target_stepsize": f"(was {old['target_stepsize']})", "feedback_iterations": "(was the default)",
                     "init": f"(was {old['init']})"}  # fmt: skip
    tune.write_config(path, {"model.init_args.target_stepsize": 0.2}, "# Tuned by test three")
    assert "target_stepsize: 0.2  # tuned (was 3.5e-05)" in path.read_text()
    tune.write_config(path, values, "# Tuned by test two")
    # the other comments are kept, in order
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#") or " #" in line]
    kept = [tune._TUNED_NOTE.sub("", line) for line in text.splitlines()[1:]]
    assert [line for line in kept if line.lstrip().startswith("#") or " #" in line] == comments
    expected = yaml.safe_load(original)
    init = expected["model"]["init_args"]
    init["forward_optimizer"]["init_args"]["lr"] = 0.0001235
    init.update(target_stepsize=3.5e-05, feedback_iterations=3, init="gaussian")
    assert yaml.safe_load(text) == expected
    with pytest.raises(KeyError, match="no block 'model.nope'"):
        tune.write_config(path, {"model.nope.x": 1}, "# Tuned by x")


def test_before_tuning_gives_back_the_config_that_write_config_changed(tmp_path):
    path = tmp_path / "lee_dtp.yaml"
    original = untuned((CONFIG_DIR / "mnist" / "lee_dtp.yaml").read_text())
    path.write_text(original)
    tune.write_config(path, {"model.init_args.forward_optimizer.init_args.lr": 0.0042, "model.init_args.init": "gaussian",
                             "model.init_args.target_stepsize": 3.5e-05, "model.init_args.feedback_iterations": 3},
                      "# Tuned by test")  # fmt: skip
    assert yaml.safe_load(path.read_text()) != yaml.safe_load(original)
    assert yaml.safe_load(tune.before_tuning(path.read_text())) == yaml.safe_load(original)
    # a shipped config that kept its tuning: DTP-AI's study changed its slope, learning rate and target step, and
    # added feedback_iterations (the thesis' values 0.35, 3e-4 and 0.1; one feedback update by default)
    dtp = yaml.safe_load(tune.before_tuning((CONFIG_DIR / "mnist" / "dtp_ai.yaml").read_text()))["model"]["init_args"]
    assert (dtp["negative_slope"], dtp["target_stepsize"]) == (0.35, 0.1) and "feedback_iterations" not in dtp
    assert dtp["forward_optimizer"]["init_args"] == {"lr": 0.0003, "weight_decay": 0.05}
    with pytest.raises(ValueError, match="no line marked 'tuned \\(was ...\\)'"):
        tune.before_tuning(original)


@needs_mnist
@pytest.mark.parametrize("tuned_lr, kept", [(3e-3, "tuned"), (1e-6, "before")])
def test_check_keeps_the_config_with_the_better_full_schedule_validation(tmp_path, monkeypatch, tuned_lr, kept):
    """One epoch on 1000 images is the "full schedule" here: lr 1e-6 barely moves the network, 3e-3 learns."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune, "CHECK_DIR", tmp_path / "runs" / "check")  # the config before tuning
    doc = yaml.safe_load(untuned((CONFIG_DIR / "mnist" / "bp.yaml").read_text()))
    doc["trainer"].update(max_epochs=1, enable_progress_bar=False)
    doc["data"]["init_args"].update(subset=1200, num_train=1000, num_val=200, data_dir=str(SHARED_DATA))
    doc["model"]["init_args"]["forward_optimizer"]["init_args"]["lr"] = 1e-4
    config = tmp_path / "bp.yaml"
    config.write_text(yaml.safe_dump(doc))
    tune.write_config(config, {"model.init_args.forward_optimizer.init_args.lr": tuned_lr}, "# Tuned by test")
    monkeypatch.setattr(tune, "_config", lambda rule: str(config))
    record = tmp_path / "runs.jsonl"
    result = tune.main(["--rule", "BP", "--check", "--record", str(record), "--out", str(tmp_path / "results.md")])
    assert result["kept"] == kept
    assert (result["tuned_best_val_acc"] > result["before_best_val_acc"]) == (kept == "tuned")
    text = config.read_text()
    assert text.startswith(f"# Checked by {tune.PROG} --rule BP --check: 1 epochs, seed 0, best val/acc")
    lr = yaml.safe_load(text)["model"]["init_args"]["forward_optimizer"]["init_args"]["lr"]
    assert lr == (tuned_lr if kept == "tuned" else 1e-4)
    # the campaign's run of seed 0 is the kept config's: recorded under the config's own key
    from benchmarks import mnist

    run = mnist.read_runs(record)[mnist.run_key("BP", str(config), 0, None, ())]
    assert run["best_val_acc"] == result[f"{kept}_best_val_acc"]
    table = (tmp_path / "results.md").read_text()
    assert "| BP | 1 | 0 |" in table and f"**{result[f'{kept}_best_val_acc']:.4f}" in table
    with pytest.raises(SystemExit, match="already checked"):  # a second check would compare the kept config with itself
        tune.main(["--rule", "BP", "--check", "--record", str(record), "--out", str(tmp_path / "results.md")])


def test_report_without_journals_says_so_and_keeps_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tune.common, "ROOT", tmp_path)  # a checkout without journals; messages name paths inside it
    monkeypatch.setattr(tune, "STUDIES", tmp_path / "docs" / "data" / "tune")
    out = tmp_path / "results.md"
    out.write_text("<!-- tuning:start -->\n| BP | an earlier row |\n<!-- tuning:end -->\n")
    with pytest.raises(SystemExit, match=r"--report: no study journal under docs/data/tune/ for BP, DTPAI, .*stay as they are"):
        tune.main(["--report", "--out", str(out)])
    assert "| BP | an earlier row |" in out.read_text()


# --------------------------------------------------------------------------------------------- dead workers
def fake_training(args, callbacks=()):
    """``train.py`` stand-in for trials: a validation accuracy of 0.5 + lr after one epoch, reported as the
    pruning callback would."""
    (pruning,) = callbacks
    acc = 0.5 + float(args[args.index("--model.init_args.forward_optimizer.init_args.lr") + 1])
    pruning.best = acc
    pruning.trial.report(acc, 0)


def seeded_study(storage, trials=TINY):
    """A journal study of BP made as ``run_study`` makes one (the proxy of ``trials``), its first trial the shipped
    config, still waiting."""
    study = optuna.create_study(study_name="mnist-BP", storage=tune.open_storage(str(storage)), direction="maximize")
    space = tune.searched("BP")
    study.set_user_attr("rule", "BP")
    study.set_user_attr("space", [p.name for p in space])
    study.set_user_attr("epochs", 1)
    study.set_user_attr("data", tune._data_overrides(tune.parse_args(["--rule", "BP", *trials])))
    study.enqueue_trial(tune.shipped_values("BP", space), user_attrs={"shipped": True})
    return study, space


def test_write_config_refuses_while_the_shipped_trial_is_unscored_and_a_dead_workers_trial_is_rerun(tmp_path, monkeypatch, capsys):
    """Trial 0 (the shipped config) is RUNNING in a worker that holds its lock, and two sampled trials are complete:
    the study is full, but --write-config refuses, naming the trial and what to do. When that worker is gone (its
    lock free), the next command fails trial 0, runs its values again as trial 3 and then writes."""
    monkeypatch.setattr("tplightning.cli.main", fake_training)
    storage = tmp_path / "bp.journal"
    config = tmp_path / "bp.yaml"
    original = (CONFIG_DIR / "mnist" / "bp.yaml").read_text()
    config.write_text(original)
    monkeypatch.setattr(tune.common, "_config_path", lambda name: config)
    study, space = seeded_study(storage)
    with tune._worker_lock(str(storage)) as lock:  # this process plays the worker of trial 0
        shipped = study.ask()
        assert shipped.number == 0
        for p in space:
            p.suggest(shipped)
        shipped.set_user_attr("worker", "elsewhere:123")
        shipped.set_user_attr("worker_lock", lock)
        for value in (0.6, 0.7):
            trial = study.ask()
            trial.suggest_float("lr", 1e-4, 3e-3, log=True)
            study.tell(trial, value)
        args = ["--rule", "BP", "--trials", "2", "--storage", str(storage), "--write-config", *TINY]
        with pytest.raises(SystemExit) as exc:
            tune.main(args)
        assert str(exc.value) == (
            f"{tune.PROG} --write-config: nothing written: trial 0 (the shipped config) of study mnist-BP is still "
            "running in worker elsewhere:123: let that worker finish it, then rerun with --write-config (a worker that "
            "died is noticed at the next run on this storage)")  # fmt: skip
        assert config.read_text() == original
        assert "0 failed (0 of them stale), 1 running, 0 waiting\n" in capsys.readouterr().out
        assert tune.fail_stale_trials(study, str(storage)) == []  # its worker is alive
    # the worker is gone: the next command fails trial 0 and runs its values again, as the shipped config
    assert (tune._workers_dir(str(storage)) / f"{lock}.lock").exists() is False  # a clean exit removes the lock
    study = tune.main(args)
    out = capsys.readouterr().out
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[3].params == trials[0].params and trials[3].user_attrs["shipped"]
    assert trials[3].system_attrs["retry_history"] == [0]
    assert trials[3].value == pytest.approx(0.5 + trials[0].params["lr"])
    assert "study mnist-BP: 3 complete, 0 pruned (0 of them diverged), 1 failed (1 of them stale), 0 running" in out
    assert ("stale: trial 0 (the shipped config): its worker elsewhere:123 died while running it; run again as "
            "trial 3") in out  # fmt: skip
    assert config.read_text().startswith("# Tuned by python -m benchmarks.tune --rule BP: study mnist-BP, 3 trials")
    assert list(tune._workers_dir(str(storage)).iterdir()) == []


def test_a_shipped_trial_that_failed_is_enqueued_again_and_retries_are_bounded(tmp_path, monkeypatch, capsys):
    """A shipped trial interrupted (FAIL, no retry) is run again by the next command, even in a full study; a sampled
    trial whose worker died is retried at most MAX_RETRY times."""
    monkeypatch.setattr("tplightning.cli.main", fake_training)
    storage = tmp_path / "bp.journal"
    study, space = seeded_study(storage)
    shipped = study.ask()
    for p in space:
        p.suggest(shipped)
    study.tell(shipped, state=TrialState.FAIL)  # as a Ctrl-C leaves it
    done = study.ask()
    done.suggest_float("lr", 1e-4, 3e-3, log=True)
    study.tell(done, 0.6)
    study = tune.main(["--rule", "BP", "--trials", "1", "--storage", str(storage), *TINY])
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].user_attrs["shipped"] and trials[2].params == trials[0].params
    assert tune.unscored_shipped(study, str(storage)) is None
    # a sampled trial whose worker is always killed: failed and enqueued again MAX_RETRY times, then left failed
    assert tune.MAX_RETRY == 2
    dead = tune._workers_dir(str(storage))
    for attempt in range(tune.MAX_RETRY + 1):
        trial = study.ask()  # the waiting retry first, if any
        trial.suggest_float("lr", 1e-4, 3e-3, log=True)
        trial.set_user_attr("worker_lock", f"gone-{attempt}")  # a worker that left no lock file
        assert tune.fail_stale_trials(study, str(storage)) == [trial.number]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 0 and list(dead.iterdir()) == []
    lines = tune.summary(study).splitlines()
    assert lines[0].endswith("4 failed (3 of them stale), 0 running, 0 waiting")
    assert lines[1:4] == ["stale: trial 3: its worker gone-0 died while running it; run again as trial 4",
                          "stale: trial 4: its worker gone-1 died while running it; run again as trial 5",
                          "stale: trial 5: its worker gone-2 died while running it; not run again (at most 2 retries)"]


def test_a_worker_killed_mid_trial_leaves_a_trial_the_next_worker_fails_and_reruns(tmp_path, monkeypatch, capsys):
    """A real worker process, SIGKILLed while it runs the shipped config (its training stands still, so the kill
    lands mid-trial): the next worker fails that trial, runs its values again (with the stand-in training, as the
    killed worker's is one) and may then write the config. The seconds are the worker's imports."""
    storage = tmp_path / "bp.journal"
    script = ("import time, tplightning.cli\n"
              "tplightning.cli.main = lambda *args, **kwargs: time.sleep(600)\n"
              "from benchmarks import tune\n"
              f"tune.main(['--rule', 'BP', '--trials', '1', '--storage', {str(storage)!r}, *{TINY!r}])\n")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and worker.poll() is None:
            if storage.exists():
                running = load(storage, "mnist-BP").get_trials(states=(TrialState.RUNNING,))
                if running and "worker" in running[0].user_attrs:  # set as the trial starts
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the worker never ran its trial: {worker.communicate()[0] if worker.poll() is not None else ''}")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    killed = running[0]
    assert killed.number == 0 and killed.user_attrs["worker"].endswith(f":{worker.pid}")
    config = tmp_path / "bp.yaml"
    config.write_text((CONFIG_DIR / "mnist" / "bp.yaml").read_text())
    monkeypatch.setattr(tune.common, "_config_path", lambda name: config)
    monkeypatch.setattr("tplightning.cli.main", fake_training)
    study = tune.main(["--rule", "BP", "--trials", "1", "--storage", str(storage), "--write-config", *TINY])
    first, again = study.get_trials()
    assert (first.state, again.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert again.params == first.params and again.user_attrs["shipped"]
    assert again.value == pytest.approx(0.5 + first.params["lr"])
    out = capsys.readouterr().out
    assert f"stale: trial 0 (the shipped config): its worker {killed.user_attrs['worker']} died while running it; run again as trial 1" in out
    assert config.read_text().startswith("# Tuned by python -m benchmarks.tune --rule BP: study mnist-BP, 1 trials")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_database_study_fails_a_trial_without_heartbeat_and_runs_it_again(tmp_path, monkeypatch):
    """On a database storage, Optuna's heartbeat: a running trial whose last beat is older than GRACE_PERIOD is failed,
    named stale and enqueued again with its values."""
    monkeypatch.setattr(tune, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(tune, "GRACE_PERIOD", 1)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    storage = tune.open_storage(url)
    study = optuna.create_study(study_name="mnist-BP", storage=storage, direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 3e-3, log=True)
    trial.set_user_attr("worker", "gone:1")
    study_id = storage.get_study_id_from_name("mnist-BP")
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))  # then it died
    assert tune.fail_stale_trials(study, url) == []  # within the grace period
    time.sleep(2.1)
    assert tune.fail_stale_trials(study, url) == [0]
    first, again = study.get_trials()
    assert (first.state, again.state) == (TrialState.FAIL, TrialState.WAITING) and again.params == first.params
    assert "stale: trial 0: no heartbeat for 1 s; run again as trial 1" in tune.summary(study)


@pytest.mark.parametrize("with_acc, kept", [(0.981, True), (0.98, True), (0.979, False)])
def test_a_schedule_check_writes_the_schedule_only_where_it_keeps_the_validation_accuracy(tmp_path, monkeypatch, with_acc, kept):
    """The runs are stand-ins with a given best validation accuracy (the decision is what is tested); the config without
    the schedule scores 0.98, and a tie keeps the schedule."""
    from benchmarks import common, mnist

    config = tmp_path / "ddtp_linear.yaml"
    original = (CONFIG_DIR / "mnist" / "ddtp_linear.yaml").read_text()
    config.write_text(original)
    monkeypatch.setattr(tune, "_config", lambda rule: str(config))
    trained = []

    def fake_run(task):
        rule, cfg, seed, epochs, overrides = task
        trained.append(list(overrides))
        acc = with_acc if overrides else 0.98
        return {"rule": rule, "config": cfg, "seed": seed, "epochs": epochs, "overrides": list(overrides), "args": [],
                "test_error": 2.0, "best_val_acc": acc, "best_epoch": 1, "epochs_run": 1, "seconds": 1.0,
                "seconds_per_epoch": 1.0, "diverged": False, "error": None, "val_acc": [acc]}  # fmt: skip

    monkeypatch.setattr(mnist, "_run_task", fake_run)
    record, out = tmp_path / "runs.jsonl", tmp_path / "results.md"
    argv = ["--rule", "DDTPLinear", "--check", "--feedback-schedule", '{"every": 2}', "--record", str(record), "--out", str(out)]
    result = tune.main(argv)
    assert result["kept"] is kept and len(trained) == 2
    text = config.read_text()
    if kept:
        assert text.startswith(f"# Feedback schedule checked by {tune.PROG} --rule DDTPLinear --check --feedback-schedule "
                               f"'{{\"every\": 2}}': 100 epochs, seed 0, best val/acc {with_acc:.4f} with the schedule against 0.9800")  # fmt: skip
        assert yaml.safe_load(text)["model"]["init_args"]["feedback_schedule"] == {"class_path": "tplightning.FeedbackSchedule",
                                                                                   "init_args": {"every": 2}}  # fmt: skip
        assert tp.DDTPLinear(sizes=[4, 5, 3], **{"feedback_schedule": tp.FeedbackSchedule(every=2)}).feedback_schedule.every == 2
    else:
        assert text == original  # left alone
    (entry,) = common.read_records(out.parent / "data" / "schedule_checks.jsonl", tune.SCHEDULE_CHECK_KIND)
    assert entry.record["kept"] is kept and entry.record["with_best_val_acc"] == with_acc
    trained.clear()
    config.write_text(original)
    tune.main(argv)  # both runs are in the record now: nothing is trained again
    assert trained == []


def test_a_schedule_check_refuses_bad_arguments_before_training():
    with pytest.raises(SystemExit, match="FeedbackSchedule every must be an integer >= 1, got 0"):
        tune.main(["--rule", "DDTPLinear", "--check", "--feedback-schedule", '{"every": 0}'])
    with pytest.raises(SystemExit):
        tune.parse_args(["--rule", "DDTPLinear", "--feedback-schedule", '{"every": 2}'])  # without --check
