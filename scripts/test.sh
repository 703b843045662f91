#!/usr/bin/env bash
# scripts/test.sh [pytest args]: set up .venv if needed, then run the whole test suite on the CPU.
# Tests run in parallel (pytest-xdist): one worker per core, at most 4 (DPO_DS_TEST_WORKERS=N to choose,
# 1 for one process; an -n/--numprocesses of your own wins). On 2 cores the gain is small (two 2-rank jobs
# contend: 29.5-32 min against 33 serial on a fresh clone); it grows with the cores.
source "$(dirname "$0")/_venv.sh"
workers="${DPO_DS_TEST_WORKERS:-$(n=$(nproc); echo $(( n < 4 ? n : 4 )))}"
parallel=()
if [ "$workers" -gt 1 ] && [[ " $* " != *" -n"* && " $* " != *" --numprocesses"* ]]; then parallel=(-n "$workers" --dist worksteal); fi
exec python -m pytest "${parallel[@]}" "$@"
