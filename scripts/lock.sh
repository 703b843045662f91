#!/usr/bin/env bash
# scripts/lock.sh: refresh the lock. Resolves setup.cfg's dependencies afresh (the newest releases it admits, as
# `scripts/test.sh --latest` installs them) in a new venv, then writes what that venv holds:
#   scripts/requirements.lock   every package at its version (what scripts/_venv.sh installs for test.sh and demo.sh)
#   tests/causal_lm_types.txt   the causal LM types of the locked transformers (the architecture survey's list)
# Then run scripts/test.sh on the new lock and commit both files with its result; git diff shows what moved.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(DPO_DS_INSTALL=latest DPO_DS_VENV="$tmp/venv" source "$ROOT/scripts/_venv.sh")
py="$tmp/venv/bin/python"
{
  echo "# The environment scripts/test.sh and scripts/demo.sh install (scripts/_venv.sh): every package at the version"
  echo "# the suite ran with. Written by scripts/lock.sh from setup.cfg on $(date -u +%F); refresh it with that script."
  echo "# Python $("$py" -c 'import platform; print(platform.python_version())') on $(uname -m); torch is the CPU build"
  echo "# extras/mlflow: $("$py" -m pip list --path "$tmp/venv/extras/mlflow" --format freeze | grep -i '^mlflow')"
  "$py" -m pip freeze --all --exclude-editable | sort -f
} > "$ROOT/scripts/requirements.lock.tmp"
mv "$ROOT/scripts/requirements.lock.tmp" "$ROOT/scripts/requirements.lock"
"$py" - > "$ROOT/tests/causal_lm_types.txt" <<'PY'
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as TYPES
print(f"# transformers {transformers.__version__}: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (scripts/lock.sh)")
print("\n".join(sorted(TYPES)))
PY
cd "$ROOT" && git diff --stat -- scripts/requirements.lock tests/causal_lm_types.txt || true
echo "lock written: now run scripts/test.sh (it installs the new lock) and commit the lock with its result"
