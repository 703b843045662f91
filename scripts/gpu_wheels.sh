#!/usr/bin/env bash
# Prepare .whl/ (ignored by git) on a CPU machine with pip access: every wheel scripts/gpu_check.sh needs that
# a bare GPU image without a registry lacks or has too old. The target: CPython 3.12, manylinux x86-64, with
# torch, transformers, accelerate, peft, pyarrow, numpy, pandas, safetensors, tokenizers already there (the
# workplace's H200 image: torch 2.11, transformers 5.17). Installed there by gpu_check.sh with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl  (+ PYTHONPATH=/tmp/site)
#
#   bash scripts/gpu_wheels.sh            # -> .whl/, under 64 MiB
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY="${PYTHON:-python3}"
platforms=()
for n in 2_28 2_27 2_24 2_17 2014 1; do
  case $n in 2014) platforms+=(--platform manylinux2014_x86_64) ;; 1) platforms+=(--platform manylinux1_x86_64) ;;
  *) platforms+=(--platform "manylinux_${n}_x86_64") ;; esac
done
fetch() {  # exact versions: one of each, or the install there stops
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
# the versions the suite ran with (scripts/requirements.lock)
locked() { for name in "$@"; do grep -iE "^${name//-/[-_]}==" scripts/requirements.lock; done; }
# the project's own floors the image does not meet (setup.cfg), and what the check runs beside dpo_ds
fetch $(locked transformers peft trl accelerate)
# datasets and what it needs beyond the image
fetch $(locked datasets dill multiprocess fsspec)
# DeepSpeed's pure-Python dependencies the image lacks
fetch $(locked hjson pydantic pydantic-core annotated-types typing-inspection)
# DeepSpeed publishes a source archive only: built here into a wheel without prebuilt ops (JIT there, if ever)
ds=$(locked deepspeed)
DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$ds" \
  2>/dev/null || DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "$ds"
ls -la .whl
size=$(du -sm .whl | cut -f1)
echo "gpu_wheels: $(ls .whl | wc -l) wheels, ${size} MiB in .whl/ (the device carries at most 64 MiB)"
[ "$size" -lt 64 ] || { echo "error: .whl/ is ${size} MiB, over the 64 MiB a device call carries" >&2; exit 1; }
