#!/usr/bin/env bash
# GPU check (under 10 minutes on one GPU): every config (but CIFAR-10's) for two batches on CUDA, the CIFAR-10 networks of torch
# modules for six batches of fake files, then the GPU speed tables, which go
# into docs/RESULTS.md marked with the GPU model:
#   - step time of every rule on the MNIST network at batch 128 and at batch 1024 (paired with BP);
#   - the exact-inverse rules at widths 256 to 4096 (Sherman-Morrison at batch 1, Woodbury at batch 32);
#   - epochs through train.py next to a plain PyTorch loop (no host sync per batch in the timed stretch);
#   - the host syncs of each MNIST config's training batches (torch.cuda.set_sync_debug_mode): none but the logging ones;
#   - each rule's step eager against torch.compile, without and with CUDA graphs (printed, not written).
#   bash scripts/gpu_check.sh            (from any folder of the checkout; MNIST in the data cache)
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("GPU:", torch.cuda.get_device_name(0))
PY
failed=0
# one process for all configs: the imports are paid once
python - <<'PY' || failed=1
import io, contextlib, sys, traceback
from tplightning.cli import main
from tplightning.config_files import available_configs
failed = False
# every config but CIFAR-10's (no CIFAR-10 files offline) and the trainer fragments
for cfg in [c for c in available_configs() if not c.startswith(("cifar10/", "trainer/"))]:
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            main(["--config", cfg, "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.fast_dev_run", "2",
                  "--trainer.enable_progress_bar", "false"])
        print("ok  ", cfg, flush=True)
    except Exception:
        failed = True
        print("FAIL", cfg, "\n" + "".join(traceback.format_exc().splitlines(True)[-5:]), flush=True)
sys.exit(1 if failed else 0)
PY
# the CIFAR-10 networks of torch modules (VGG-like of Ernoult et al. 2022, small residual network) for a few batches of
# fake CIFAR-shaped files (no CIFAR-10 here), at their configs' own feedback iterations: seconds per training step
python - <<'PY' || failed=1
import contextlib, hashlib, io, pickle, sys, tempfile, time, traceback
from pathlib import Path
import numpy as np
from tplightning.cli import main
from tplightning.data import cifar10
root = Path(tempfile.mkdtemp()) / "data"
(root / cifar10.FOLDER).mkdir(parents=True)
rng = np.random.default_rng(0)
for name in list(cifar10.MD5):  # 5 training files of 256 images and a test file, their md5 sums in place of the published
    data = pickle.dumps({b"data": rng.integers(0, 256, (256, 3072), dtype=np.uint8), b"labels": [int(v) for v in rng.integers(0, 10, 256)]})
    (root / cifar10.FOLDER / name).write_bytes(data)
    cifar10.MD5[name] = hashlib.md5(data).hexdigest()
failed, steps = False, 6
for cfg in ["cifar10/vgg_bp.yaml", "cifar10/vgg_ldrl.yaml", "cifar10/resnet_bp.yaml", "cifar10/resnet_ldrl.yaml"]:
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            main(["--config", cfg, "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_steps", str(steps),
                  "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
                  "--trainer.enable_progress_bar", "false", "--data.init_args.data_dir", str(root), "--data.init_args.num_train", "1024",
                  "--data.init_args.num_val", "256", "--test_on", "final"])
        print(f"ok   {cfg}: {(time.perf_counter() - start) / steps:.2f} s per step (with start-up, validation and test)", flush=True)
    except Exception:
        failed = True
        print("FAIL", cfg, "\n" + "".join(traceback.format_exc().splitlines(True)[-5:]), flush=True)
sys.exit(1 if failed else 0)
PY
speed="python -m benchmarks.speed --device cuda"
$speed --part mnist --steps 30 --repeats 2
$speed --part mnist --steps 30 --repeats 2 --batch 1024
$speed --part exact --steps 20 --repeats 1 --widths 256 512 1024 2048 4096 --batches 1 32
$speed --part trainer --repeats 2 --trainer-threads 1
python -m benchmarks.syncs --device cuda
# torch.compile of each rule's tensor work against eager (no gain on a CPU), and with CUDA graphs
python scripts/ab_step_time.py --compile --device cuda --steps 100 BP DTPAI LeeDTP OriginalDTP
python scripts/ab_step_time.py --compile --compile-mode reduce-overhead --device cuda --steps 100 BP DTPAI LeeDTP OriginalDTP
exit $failed
