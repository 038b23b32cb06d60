"""Checkpoints that survive a kill and refuse a changed bit (issue 28, item 2).

A save killed half-way leaves the previous ``last.ckpt`` intact and nothing in the temporary folder, even when that
folder is on another filesystem than the checkpoints (``/dev/shm`` is a RAM filesystem); the next save removes the
temporary file the kill left beside the checkpoint. A checkpoint with a flipped bit is refused by ``tp.load`` and by
the CLI's ``--ckpt_path`` check.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tplightning as tp
from conftest import REPO, quiet_trainer
from tplightning.checkpoints import read
from tplightning.errors import ConfigError
from train import main

QUIET = ["--trainer.enable_progress_bar", "false"]
LAST = Path("runs/dtp/version_0/checkpoints/last.ckpt")

# trains a tiny BP for 2 epochs with tp.Checkpoint writing last.ckpt after each; during epoch 1's save, the writer
# stops half-way through the bytes of the file (os._exit: no clean-up runs). Two writers are patched: torch.save into
# a real file, and os.sendfile, which shutil uses to copy a file from another filesystem into place.
KILLED_SAVE = textwrap.dedent('''
    import functools, io, os, sys
    import torch
    import tplightning as tp
    from tplightning._lightning import pl

    folder = sys.argv[1]
    armed = False
    real_save, real_sendfile = torch.save, os.sendfile

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO) or not hasattr(f, "write") or not armed:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os._exit(9)

    def sendfile(out_fd, in_fd, offset, count):
        if not armed:
            return real_sendfile(out_fd, in_fd, offset, count)
        real_sendfile(out_fd, in_fd, offset, 100)
        os._exit(9)

    torch.save, os.sendfile = save, sendfile

    class Arm(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            global armed
            armed = trainer.current_epoch == 1

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    rule = tp.BP(sizes=[4, 3, 2], forward_optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[tp.Checkpoint(dirpath=folder, save_top_k=0), Arm()])
    trainer.fit(rule, loader)
    sys.exit("the save was not interrupted")
''')


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm, a filesystem apart from the test folder's")
def test_a_killed_save_keeps_the_previous_last_ckpt_and_leaves_no_temporary_file(tmp_path):
    folder, tmpdir = tmp_path / "ckpt", Path(f"/dev/shm/tplightning-test-{os.getpid()}")
    tmpdir.mkdir(exist_ok=True)
    script = tmp_path / "killed_save.py"
    script.write_text(KILLED_SAVE)
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run([sys.executable, str(script), str(folder)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 9, done.stderr[-2000:]
        assert list(tmpdir.iterdir()) == []  # nothing orphaned in the temporary folder
    finally:
        for p in tmpdir.iterdir():
            p.unlink()
        tmpdir.rmdir()
    assert read(folder / "last.ckpt")["epoch"] == 0  # the previous checkpoint, whole
    left = [p.name for p in folder.iterdir() if p.name != "last.ckpt"]
    assert len(left) == 1 and left[0].startswith(".last.ckpt.tmp-")  # the killed save's own file, beside it
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = quiet_trainer(enable_checkpointing=True, callbacks=[tp.Checkpoint(dirpath=folder, save_top_k=0)])
    trainer.fit(tp.BP(sizes=[4, 3, 2]), loader)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # the next save removed the stale file
    assert read(folder / "last.ckpt")["epoch"] == 0 and read(folder / "last.ckpt")["global_step"] == 1


def _flip_a_weight_bit(path: Path) -> None:
    """Flip one bit of the first forward weight's bytes in the file (the archive stays readable)."""
    data = bytearray(path.read_bytes())
    weight = torch.load(path, weights_only=False)["state_dict"]["net.layers.0.weight"]
    at = bytes(data).find(weight.numpy().tobytes())
    assert at > 0
    data[at + 1] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_refused_by_load_and_by_the_cli(capsys):
    main(["--config", "dtp.yaml", "--trainer.max_epochs", "1", "--test_on", "none", *QUIET])
    assert type(tp.load(LAST)) is tp.DTPAI  # whole: loads
    _flip_a_weight_bit(LAST)
    message = f"checkpoint {LAST}: checksum mismatch: the file is corrupt"
    with pytest.raises(ConfigError) as info:
        tp.load(LAST)
    assert str(info.value) == message
    from tplightning.cli import run

    sys.argv = ["train.py", "--config", "dtp.yaml", "--trainer.max_epochs", "2", "--ckpt_path", str(LAST), *QUIET]
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_every_checkpoint_of_a_cli_run_carries_its_digest():
    main(["--config", "dtp.yaml", "--trainer.max_epochs", "2", "--test_on", "none", *QUIET])
    files = sorted(LAST.parent.iterdir())
    assert len(files) == 2  # last.ckpt and Lightning's best one
    for path in files:
        ckpt = torch.load(path, weights_only=False)
        assert ckpt[tp.checkpoints.CHECKSUM_KEY] == tp.checkpoints.content_digest(ckpt)
