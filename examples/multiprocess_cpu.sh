#!/usr/bin/env bash
# Multi-process DISAM on one machine: 2 processes x 2 host CPU devices, joined over loopback (gloo collectives).
# The batch of every domain is sharded over the 4 devices; each process loads only its slice; process 0 writes the
# run directory. The result equals a one-device run with the same seed (tests/test_harness_distributed.py).
# On a TPU pod or GPU cluster, run disam-train on every host instead (docs/distributed.md).
set -euo pipefail
OUT="${1:-runs/multiprocess-$(date +%Y%m%d-%H%M%S)}"
python -m disam_jax.harness.launch --num-processes 2 --devices-per-process 2 -- \
  disam-train --dataset rotated_digits --algorithm erm sam disam --held-out 75 --steps 300 \
  --batch-size 32 --output-dir "$OUT"
