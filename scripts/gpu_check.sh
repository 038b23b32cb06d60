#!/usr/bin/env bash
# GPU smoke check (about 5 minutes on one GPU): every config for one batch on CUDA, then the
# speed benchmark on the GPU, whose tables go into docs/RESULTS.md marked with the GPU model.
#   bash scripts/gpu_check.sh            (from the repository root, with the package installed)
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print("GPU:", torch.cuda.get_device_name(0))
PY
failed=0
for cfg in configs/*.yaml configs/mnist/*.yaml; do
  [ -e "$cfg" ] || continue
  if python train.py --config "$cfg" --trainer.accelerator gpu --trainer.devices 1 --trainer.fast_dev_run 2 \
       --trainer.enable_progress_bar false > /tmp/gpu_check.log 2>&1; then
    echo "ok   $cfg"
  else
    echo "FAIL $cfg"; tail -5 /tmp/gpu_check.log; failed=1
  fi
done
python -m tplightning.benchmarks.speed --device cuda --steps 30 --widths 256 512 1024 2048 4096
exit $failed
