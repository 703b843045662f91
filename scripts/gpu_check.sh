#!/usr/bin/env bash
# The prepared GPU check: one command on a bare GPU machine (CUDA torch present, no registry), writing
# $OUT/gpu_check.json and $OUT/gpu_check.md within its budget (default 480 s: one H200 lease of 15 minutes
# holds a start and this, with a margin). Wheels the image lacks come from .whl/ (scripts/gpu_wheels.sh).
#
#   bash scripts/gpu_check.sh [--budget SECONDS]     # on the GPU machine (the device tool: carry .whl)
#   bash scripts/gpu_check.sh --cpu-smoke            # here: the same script end to end on a tiny model, fp32
#
# On your own GPU with a normal install (pip install -e '.[bench]'), the same: OUT=runs/gpu_check bash ...
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu-smoke" ]; then
  source "$ROOT/scripts/_venv.sh"
  set +e
  exec python "$ROOT/scripts/gpu_check.py" --out "$OUT" "$@"
fi
cd "$ROOT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl > "$OUT/gpu_check.log" 2>&1; then  # the result files say so: one call always returns them
    echo '{"mode": "gpu", "parts": {"inputs": {"error": "the carried wheels did not install: gpu_check.log"}}}' \
      > "$OUT/gpu_check.json"
    printf '# dpo_ds GPU check\n\nThe carried wheels (.whl/) did not install: see gpu_check.log.\n' > "$OUT/gpu_check.md"
    echo "error: the carried wheels did not install (.whl/, scripts/gpu_wheels.sh): $OUT/gpu_check.log"; exit 1
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 "$ROOT/scripts/gpu_check.py" --out "$OUT" "$@"
