#!/usr/bin/env bash
# Sets up .venv (scripts/env.sh), then runs the whole test suite and the benchmark suites once (no timing asserts);
# with no arguments, also compiles the Triton kernels with the GPU machines' triton version.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m pytest tests bench -q --benchmark-disable -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
  echo "Triton kernels, compiled again with triton $NFORMER_GPU_TRITON_VERSION (the GPU machines' version):"
  PYTHONPATH="$NFORMER_GPU_TRITON" python -c "import sys, triton; sys.exit(triton.__version__ != '$NFORMER_GPU_TRITON_VERSION')"
  PYTHONPATH="$NFORMER_GPU_TRITON" python -m pytest tests/test_triton_compile.py -q -p no:cacheprovider
fi
