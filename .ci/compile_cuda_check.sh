#!/usr/bin/env bash
# Compile and link csrc/ops.cpp + csrc/cuda/*.cu (no GPU needed) into a scratch build dir and
# print ptxas register/spill figures per kernel. Usage: .ci/compile_cuda_check.sh [ARCHS] [BUILD_DIR]
#   ARCHS defaults to "8.6;9.0"; set PYTHON to pick the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${1:-8.6;9.0}"
BUILD_DIR="${2:-/tmp/nf_cuda_build}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
mkdir -p "$BUILD_DIR"
LOG="$BUILD_DIR/build.log"
"${PYTHON:-python}" - "$BUILD_DIR" >"$LOG" 2>&1 <<'PY' || { tail -60 "$LOG"; exit 1; }
import glob, sys
from torch.utils.cpp_extension import load
try:
    load(name="nformer_cuda_check", sources=["csrc/ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))],
         extra_include_paths=["csrc"], extra_cflags=["-O3", "-DNFORMER_WITH_CUDA"],
         extra_cuda_cflags=["-O3", "-lineinfo", "-Xptxas=-v"],  # setup.py's nvcc flags (no fast math) + the report
         build_directory=sys.argv[1], with_cuda=True, verbose=True)
except (ImportError, OSError) as exc:  # built and linked; loading needs a GPU driver
    print(f"built; not loadable here: {exc}")
PY
test -f "$BUILD_DIR/nformer_cuda_check.so" || { tail -60 "$LOG"; echo "no .so produced"; exit 1; }
# ptxas -v prints, per kernel: "Compiling entry function '<name>' for 'sm_XX'", then its
# "N bytes spill stores, M bytes spill loads" and "Used R registers" lines.
grep -E "Compiling entry function|bytes spill stores|Used [0-9]+ registers" "$LOG" | c++filt | awk '
  /Compiling entry function/ { match($0, /for .sm_[0-9]+/); arch = substr($0, RSTART + 5, RLENGTH - 5);
                               name = $0; sub(/.*Compiling entry function ./, "", name);
                               gsub(/\(anonymous namespace\)::/, "", name); sub(/\(.*/, "", name);
                               sub(/^[^<]*::/, "", name) }
  /bytes spill stores/        { stores = $5; loads = $9 }
  /Used [0-9]+ registers/     { match($0, /Used [0-9]+/); printf "  %-7s %4s regs  spill %s/%s B  %s\n", arch,
                                substr($0, RSTART + 5, RLENGTH - 5), stores, loads, name }' | sort -u
if grep -qE "[1-9][0-9]* bytes spill (stores|loads)" "$LOG"; then echo "WARNING: register spills (see above)"; fi
echo "OK: compiled and linked for $TORCH_CUDA_ARCH_LIST ($BUILD_DIR/nformer_cuda_check.so)"
