"""One Lightning package, chosen once (issue 29, finding 8): ``import tplightning`` before ``import lightning`` keeps
``pytorch_lightning``, and a data module or trainer of the other package given to a rule fails with a message that
names both packages and the fix, not with Lightning's "Expected a parent"."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

pytest.importorskip("lightning", reason="the unified package is the 'lightning' extra: pip install -e '.[lightning]'")

FIX = ("the packages 'pytorch_lightning' and 'lightning' cannot be mixed. Use 'pytorch_lightning' throughout, or import "
       "lightning before tplightning (or set TPLIGHTNING_LIGHTNING=lightning) to have tplightning use 'lightning'.")  # fmt: skip


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TPLIGHTNING_LIGHTNING"}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_data_module_of_the_other_package_is_named(tmp_path):
    proc = _python("""
        import torch
        import tplightning as tp
        import lightning as L  # after tplightning: tplightning stays on pytorch_lightning
        from torch.utils.data import DataLoader, TensorDataset
        from tplightning._lightning import pl

        class Data(L.LightningDataModule):
            def train_dataloader(self):
                return DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 4)), batch_size=4)

        print(tp._lightning.PACKAGE)
        rule = tp.BP(sizes=[4, 4, 4], forward_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(rule, datamodule=Data())
    """, tmp_path)  # fmt: skip
    assert proc.stdout.strip() == "pytorch_lightning", proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "TypeError: the data module Data is a 'lightning' object, but tplightning was loaded for 'pytorch_lightning' " \
                   "(chosen once, when tplightning was first imported); " + FIX, proc.stderr[-3000:]  # fmt: skip


def test_the_rule_is_documented():
    for page in ("README.md", "docs/getting-started.md"):
        text = " ".join((REPO / page).read_text().split())
        assert "import lightning before tplightning" in text, page


def test_importing_the_other_package_afterwards_warns_with_the_fix(tmp_path):
    """The mix no hook of ours sees (the other package's Trainer refuses the rule itself) is named at the import."""
    late = _python("""
        import warnings
        warnings.simplefilter("always")
        import tplightning
        import lightning
    """, tmp_path)  # fmt: skip
    assert late.returncode == 0, late.stderr[-2000:]
    text = " ".join(late.stderr.split())
    assert "LightningMixWarning: 'lightning' is imported after tplightning chose 'pytorch_lightning'" in text, late.stderr[-2000:]
    assert "Import lightning before tplightning (or set TPLIGHTNING_LIGHTNING=lightning)" in text, late.stderr[-2000:]
    early = _python("""
        import warnings
        warnings.simplefilter("always")
        import lightning
        import tplightning
        print(tplightning._lightning.PACKAGE)
    """, tmp_path)  # fmt: skip
    assert early.stdout.strip() == "lightning" and "LightningMixWarning" not in early.stderr, early.stderr[-2000:]
