#!/usr/bin/env bash
# scripts/test.sh [--latest | --floors] [pytest args]: set up .venv if needed (from scripts/requirements.lock), then
# run the whole test suite on the CPU.
#   --latest   in .venv-latest, the newest releases setup.cfg admits, resolved again now: what the next lock would
#              be (not part of CI; run it before scripts/lock.sh to see whether upgrading is safe)
#   --floors   in .venv-floors, every direct dependency at the floor setup.cfg claims
# Tests run in parallel (pytest-xdist): one worker more than the cores, at most 4 (many tests wait on a scheduler,
# a timeout or a peer while holding no core; DPO_DS_TEST_WORKERS=N to choose, 1 for one process; an
# -n/--numprocesses of your own wins). Each worker takes the next test as it finishes one,
# in collection order (tests/conftest.py puts those that start processes first), a test group (xdist_group:
# the SmolLM2 tests) whole.
case "${1:-}" in
  --latest) export DPO_DS_INSTALL=latest; shift ;;
  --floors) export DPO_DS_INSTALL=floors; shift ;;
esac
source "$(dirname "$0")/_venv.sh"
echo "[test] $(python -c 'from importlib.metadata import version as v
print(", ".join(f"{p} {v(p)}" for p in ("torch", "transformers", "deepspeed")))') ($INSTALL)"
workers="${DPO_DS_TEST_WORKERS:-$(n=$(( $(nproc) + 1 )); echo $(( n < 4 ? n : 4 )))}"
# one thread per process: the workers' jobs already fill the cores, and OpenMP threads that outnumber them spin
# (a 1-rank SmolLM2 LoRA run beside a 2-rank job took 207 s, 20 s alone)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
parallel=()
if [ "$workers" -gt 1 ] && [[ " $* " != *" -n"* && " $* " != *" --numprocesses"* ]]; then parallel=(-n "$workers" --dist loadgroup --no-loadscope-reorder); fi
exec python -m pytest "${parallel[@]}" "$@"
