#!/usr/bin/env bash
# Quick start, command 1: the main job on the embedded default dataset (scikit-learn's bundled digits, rotated
# into six domains; no download). Extra arguments are passed through.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec python examples/rotated_digits.py "$@"
