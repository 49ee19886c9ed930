#!/usr/bin/env bash
# Sets up .venv (scripts/env.sh), then runs the whole test suite and the benchmark suites once (no timing
# asserts) on every core (pytest-xdist, the CUDA-emulation cases on one worker; NFORMER_TEST_WORKERS=0 runs
# them in this process); with no arguments, also compiles every Triton kernel with triton 3.6.0, the oldest
# supported version.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m pytest tests bench -q -n "${NFORMER_TEST_WORKERS:-auto}" --dist loadgroup --benchmark-disable \
  -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
  echo "Triton kernels, compiled again with triton $NFORMER_OLDEST_TRITON_VERSION (the oldest supported version):"
  PYTHONPATH="$NFORMER_OLDEST_TRITON" python -c "import sys, triton; sys.exit(triton.__version__ != '$NFORMER_OLDEST_TRITON_VERSION')"
  PYTHONPATH="$NFORMER_OLDEST_TRITON" python -m pytest tests/test_triton_compile.py -q -p no:cacheprovider
fi
