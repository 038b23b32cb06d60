"""``python -m tplightning predict`` works with the shipped configs: the data modules' predict split is the test set, and
the outputs land in ``<run folder>/predict-<checkpoint>/predictions.pt`` (issue 29, finding 3)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tplightning as tp

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tplightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _mnist_present() -> bool:
    from tplightning.data.mnist import default_data_dir, find_files

    return all(find_files(default_data_dir()).values())


@pytest.mark.parametrize("config, name, rows, outputs", [
    ("dtp.yaml", "dtp", 1000, 6),
    pytest.param("mnist/bp.yaml", "mnist_bp", 10000, 10, marks=pytest.mark.skipif(not _mnist_present(), reason="MNIST not in the data cache")),
])
def test_fit_then_predict(config, name, rows, outputs, tmp_path):
    _run(["fit", "--config", config, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"], tmp_path)
    run = tmp_path / "runs" / name / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    out = _run(["predict", "--config", config, "--ckpt_path", str(ckpt)], tmp_path)
    path = run / "predict-last" / "predictions.pt"
    assert f"predictions ({rows}, {outputs}) written to {path}" in out
    predictions = torch.load(path)
    assert predictions.shape == (rows, outputs)
    # the rows are the trained model's outputs for the test split, in its order
    rule = tp.load(ckpt)
    data = _data_module(run)
    data.setup("test")
    with torch.no_grad():
        expected = rule(data.test_data.x)
    torch.testing.assert_close(predictions, expected, rtol=1e-5, atol=1e-6)


def _data_module(run: Path):
    """The data module of the run's saved config."""
    import yaml

    spec = yaml.safe_load((run / "config.yaml").read_text())["data"]
    return getattr(tp, spec["class_path"].rsplit(".", 1)[-1])(**spec.get("init_args", {}))


def test_every_data_module_has_a_predict_split():
    data = tp.StudentTeacherDataModule(sizes=[3, 2], num_train=8, num_val=4, num_test=5, eval_batch_size=2)
    data.setup("predict")
    batches = list(data.predict_dataloader())
    assert [tuple(x.shape) for x, _ in batches] == [(2, 3), (2, 3), (1, 3)]
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), torch.cat([x for x, _ in data.test_dataloader()]))
