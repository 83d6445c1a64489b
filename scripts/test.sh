#!/usr/bin/env bash
# Quick start, command 2: the test suite (pytest; exit code 5, "no tests collected", is a failure too). The default
# run skips the `slow` tier (pyproject addopts); `bash scripts/test.sh -m slow` runs it, as .ci/run does.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
# Two pytest-xdist workers, each test file on one worker (its module-level compiled steps stay shared):
# DISAM_JAX_TEST_WORKERS=N for more, 0 for one process.
exec python -m pytest -n "${DISAM_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
