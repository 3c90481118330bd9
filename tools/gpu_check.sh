#!/usr/bin/env bash
# The GPU check on a lent machine (docs/gpu.md): install the carried wheels, then run tools/gpu_check.py.
#   device tool: command "bash tools/gpu_check.sh", carry [".gpucheck"], timeout_s 540
#   results: $OUT/gpu_check.{json,md} + gpu_check.log + install.log (written as it goes)
# BUDGET_S (default 420) is the check's own time budget; it stops starting new work after it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu/latest}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 ZOEXP_CACHE_DIR=${ZOEXP_CACHE_DIR:-/tmp/zoexp-cache} HF_HUB_OFFLINE=1
site=/tmp/zoexp-site
if ls .gpucheck/wheels/*.whl >/dev/null 2>&1; then
  # only packages the image lacks travel (tools/gpu_pack.py), so nothing of the image is shadowed
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      .gpucheck/wheels/*.whl >"$OUT/install.log" 2>&1; then
    echo "installed: $(ls .gpucheck/wheels | tr '\n' ' ')"
  else
    echo "wheel install failed (see install.log); continuing: entries that need hydra will say so"
  fi
else
  echo "no .gpucheck/wheels: run 'make gpu-pack' on the development machine first and carry .gpucheck" | tee "$OUT/install.log"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >>"$OUT/install.log" 2>&1 || true
$PY tools/gpu_check.py --out "$OUT" --budget-s "${BUDGET_S:-420}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
