"""Every shipped config's short-run test metrics, exactly: the check that a refactor changed no number.

    python scripts/config_metrics.py --out before.json            # on the old checkout
    python scripts/config_metrics.py --out after.json --compare before.json

Each config runs as shipped (its seeds, its hyper-parameters) for a short schedule: one epoch of the student-teacher
and chapter-6 configs (the batch-size-1 ones: 300 batches), and one epoch of the MNIST configs on a 2000-image subset
with one test batch. Metrics are written as ``repr`` of the float, so "same" means bit-identical. ``--compare`` prints
each config whose metrics differ and exits 1 if any does. Run it from the checkout's root with one torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--test_on", "final", "--trainer.max_epochs", "1", "--threads", "1"]  # fmt: skip
MNIST_SMALL = ["--data.init_args.subset", "2000", "--data.init_args.num_train", "1500", "--data.init_args.num_val", "500",
               "--trainer.limit_test_batches", "1"]  # fmt: skip


def config_dir() -> Path:
    for candidate in (Path("tplightning/configs"), Path("configs")):
        if candidate.is_dir():
            return candidate
    raise SystemExit("run from the checkout's root (no configs/ or tplightning/configs/ here)")


def configs(root: Path) -> list[str]:
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
    return [n for n in names if not n.startswith(("trainer/", "cifar10/"))]


def args_for(root: Path, name: str) -> list[str]:
    cfg = yaml.safe_load((root / name).read_text())
    data = cfg["data"]["class_path"].rsplit(".", 1)[1]
    extra = list(QUIET)
    if data == "MNISTDataModule":
        extra += MNIST_SMALL
    elif cfg["data"].get("init_args", {}).get("batch_size") == 1:
        extra += ["--trainer.limit_train_batches", "300"]
    callbacks = [cb for cb in cfg.get("trainer", {}).get("callbacks", []) or [] if not cb["class_path"].endswith("Checkpoint")]
    return ["--config", name, *extra, "--trainer.callbacks", json.dumps(callbacks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare")
    parser.add_argument("--only", nargs="*", help="config names (default: all)")
    opts = parser.parse_args()
    sys.path.insert(0, os.getcwd())
    torch.set_num_threads(1)
    from train import main as train_main

    root = config_dir()
    results = json.loads(Path(opts.out).read_text()) if Path(opts.out).is_file() else {}
    for name in opts.only or configs(root):
        if name in results:
            continue
        out = train_main(args_for(root, name))
        results[name] = {k: repr(float(v)) for k, v in sorted(out["test_metrics"].items())}
        print(name, results[name], flush=True)
        Path(opts.out + ".tmp").write_text(json.dumps(results, indent=1, sort_keys=True))
        os.replace(opts.out + ".tmp", opts.out)
    if opts.compare:
        before = json.loads(Path(opts.compare).read_text())
        differ = [n for n in results if n in before and before[n] != results[n]]
        missing = sorted(set(before) - set(results)) if not opts.only else []
        for n in differ:
            print(f"DIFFERS {n}: before {before[n]} after {results[n]}")
        print(f"{len(results) - len(differ)} of {len(results)} configs identical; {len(differ)} differ; missing here: {missing or 'none'}")
        raise SystemExit(1 if differ or missing else 0)


if __name__ == "__main__":
    main()
