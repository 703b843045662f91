#!/usr/bin/env bash
# scripts/test.sh [pytest args]: set up .venv if needed, then run the whole test suite on the CPU.
# Tests run in parallel (pytest-xdist): one worker per core, at most 4 (DPO_DS_TEST_WORKERS=N to choose,
# 0 for one process); most tests launch 1-2 ranks and leave a core idle much of the time.
source "$(dirname "$0")/_venv.sh"
workers="${DPO_DS_TEST_WORKERS:-$(n=$(nproc); echo $(( n < 4 ? n : 4 )))}"
parallel=()
if [ "$workers" -gt 1 ] && [[ " $* " != *" -n "* ]]; then parallel=(-n "$workers" --dist worksteal); fi
exec python -m pytest "${parallel[@]}" "$@"
