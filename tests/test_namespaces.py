"""Both Lightning namespaces (issue 12, point 5): ``pytorch_lightning`` (default) and the unified ``lightning``.

The choice is made once, at import, by :mod:`tplightning._lightning` (``TPLIGHTNING_LIGHTNING``, or
``lightning`` when only it was imported first); each case runs in a fresh interpreter.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tplightning as tp

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("lightning", reason="the unified package is the 'lightning' extra: pip install -e '.[lightning]'")


def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TPLIGHTNING_LIGHTNING"}
    full_env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)


def test_default_is_pytorch_lightning():
    expected = os.environ.get("TPLIGHTNING_LIGHTNING") or "pytorch_lightning"
    assert tp._lightning.PACKAGE == expected
    prefix = {"pytorch_lightning": "pytorch_lightning.", "lightning": "lightning.pytorch."}[expected]
    other = {"pytorch_lightning": "lightning.pytorch.", "lightning": "pytorch_lightning."}[expected]
    modules = [c.__module__ + "." for c in tp.LearningRule.__mro__]
    assert any(m.startswith(prefix) for m in modules) and not any(m.startswith(other) for m in modules)


def test_unified_package_works_and_a_mix_names_both_packages(tmp_path):
    code = """
        import contextlib, io
        import lightning as L
        import torch
        from functools import partial
        import tplightning as tp
        assert tp._lightning.PACKAGE == "lightning", tp._lightning.PACKAGE
        rule = tp.DTPAI(forward_optimizer=partial(torch.optim.SGD, lr=0.1), feedback_optimizer=partial(torch.optim.SGD, lr=0.01))
        dm = tp.StudentTeacherDataModule(num_train=64, num_val=32, num_test=32, batch_size=8)
        trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[tp.InitNearTeacher(), tp.Checkpoint(dirpath="ckpt"), tp.TargetPropDiagnostics(every_n_steps=4)])
        trainer.fit(rule, datamodule=dm)
        assert rule.batches_seen == 16
        assert type(tp.load("ckpt/last.ckpt")) is tp.DTPAI
        from tplightning.cli import main, report
        out = main(["--config", "dtp.yaml", "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"])
        assert type(out["cli"].trainer).__module__.startswith("lightning.pytorch"), type(out["cli"].trainer)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                report(main, ["--config", "dtp.yaml", "--trainer.fast_dev_run", "1",
                              "--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor"])
            except SystemExit as e:
                assert e.code == 2
        print(err.getvalue())
        print("OK")
    """
    proc = _python(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
    assert "pytorch_lightning.callbacks.LearningRateMonitor belongs to the 'pytorch_lightning' package, but tplightning runs on 'lightning'" in proc.stdout
    assert "the packages 'pytorch_lightning' and 'lightning' cannot be mixed" in proc.stdout
    bad = _python("import tplightning", tmp_path, TPLIGHTNING_LIGHTNING="lightnin")
    assert "TPLIGHTNING_LIGHTNING='lightnin' is not a Lightning package; expected 'pytorch_lightning' or 'lightning'" in bad.stderr


def test_a_foreign_trainer_is_named():
    class Foreign:  # stands for the other package's Trainer
        pass

    other = "lightning.pytorch.trainer.trainer" if tp._lightning.PACKAGE == "pytorch_lightning" else "pytorch_lightning.trainer.trainer"
    Foreign.__module__ = other
    with pytest.raises(TypeError, match=r"the packages 'pytorch_lightning' and 'lightning' cannot be mixed"):
        tp.InitNearTeacher().setup(Foreign(), None, "fit")
