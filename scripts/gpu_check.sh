#!/usr/bin/env bash
# Validates nformer_kernels on any CUDA machine with torch (and triton) installed: environment + build
# for the visible GPU's arch, a smoke check of every backend, the headline measurements (knn and
# neighbor_attention at N=1M, NFormer eval vs the dense baselines), the GPU test suite, the Triton
# tuning grids. Results go into OUT_DIR as they come: a compact flat folder (log, JUnit XML, JSON,
# Markdown summary, plots) that `nformer-bench report OUT_DIR` turns into the README's GPU table.
#   [NFORMER_GIT_COMMIT=$(git rev-parse HEAD)] scripts/gpu_check.sh OUT_DIR [--budget-s S] [--stages ...] [--dry-run]
# No budget: every stage runs to its end. --dry-run: every stage on the CPU at tiny sizes (a test of
# this script; about two minutes). PYTHON picks the interpreter (default: python3, else python); a copy
# of the sources without .git names its commit in NFORMER_GIT_COMMIT. `nformer-bench check --help`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -eq 0 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
  exit $(( $# == 0 ? 2 : 0 ))
fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m nformer_bench check "$@"
