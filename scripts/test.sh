#!/usr/bin/env bash
# scripts/test.sh [pytest args]: set up .venv if needed, then run the whole test suite on the CPU.
source "$(dirname "$0")/_venv.sh"
exec python -m pytest "$@"
