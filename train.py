"""Train a target-propagation rule: ``python train.py --config dtp.yaml``.

Fits, then tests. Configs compose (``--config a.yaml --config trainer/debug.yaml``), any value can
be overridden (``--trainer.max_epochs 3``), ``--print_config`` shows the merged result and
``--ckpt_path`` resumes. See README.md.
"""
from tplightning.cli import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
