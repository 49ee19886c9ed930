#!/usr/bin/env bash
# Validates nformer_kernels on any CUDA machine with torch (and triton) installed, inside a time budget:
# environment + build for the visible GPU's arch, a smoke check of every backend, the headline
# measurements (knn and neighbor_attention at N=1M, NFormer eval vs the dense baselines), the GPU
# test suite, then the Triton tuning grids with the time left. Results go into OUT_DIR as they come:
# a compact flat folder (log, JUnit XML, JSON, Markdown summary, plots) that
# `nformer-bench report OUT_DIR` turns into the README's GPU table.
#   scripts/gpu_check.sh OUT_DIR [--budget-s 480] [--dry-run]
# --dry-run runs every stage on the CPU at tiny sizes (a test of this script; about a minute).
# PYTHON picks the interpreter (default: python3, else python). A copy of the sources without .git
# can name its commit in NFORMER_GIT_COMMIT. Stages: `python3 -m nformer_bench check --help`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -eq 0 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,11s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit $(( $# == 0 ? 2 : 0 ))
fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m nformer_bench check "$@"
