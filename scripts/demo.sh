#!/usr/bin/env bash
# Quick start, command 1: the main job, the DomainBed-style harness on the embedded default dataset
# (scikit-learn's bundled 8x8 digits rotated into six domains; no download): leave-one-domain-out ERM vs SAM vs
# DISAM, printing the held-out accuracy table and writing a run directory under runs/. Extra arguments are passed
# to disam-train (see `disam-train --help`).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec disam-train --dataset rotated_digits --algorithm erm sam disam "$@"
