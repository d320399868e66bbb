#!/usr/bin/env bash
# One command on a CUDA machine, right after the README's install command
# (python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e .):
# the GPU-marked tests, then scoring (ViT-B-32 / RN50 / ViT-B-16), training and a full 50,000-image
# `cgd run`, each step under a timeout within one time budget; prints one table and appends one JSON
# line per step to the results folder. No downloads: random weights, synthetic data.
#
#   bash bench/gpu_check.sh [--out DIR] [--budget-s SECONDS] [--dry-run] [--steps a,b]
#
# --dry-run (automatic when CUDA is not available) runs every step on the CPU at tiny sizes.
# See bench/README.md, "GPU check".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || true)"
  if [[ -z "$PY" ]]; then
    echo "gpu_check.sh: no $ROOT/.venv/bin/python and no python3 on PATH; install first:" >&2
    echo "  python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e ." >&2
    exit 2
  fi
fi
exec "$PY" "$ROOT/bench/gpu_check.py" "$@"
