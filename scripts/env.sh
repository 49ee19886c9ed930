#!/usr/bin/env bash
# Creates (once) the project virtualenv .venv and builds nformer_kernels into it (editable, extension in place).
# Sourced by scripts/demo.sh and scripts/test.sh; safe to re-run (it rebuilds only what changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NFORMER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# pip, without its warnings about local wheel folders (--find-links); pipefail keeps its exit status.
pip_quiet() { { python -m pip -q "$@" 2>&1; } | { grep -v -e "^WARNING: Location" -e "^\s*$" || true; }; }
if [ ! -f "$VENV/.deps-installed" ] || [ "$ROOT/scripts/env.sh" -nt "$VENV/.deps-installed" ]; then
  pip_quiet install --upgrade pip setuptools wheel
  # torch 2.14.1 is the CUDA 13 build: its headers let CI compile csrc/cuda even on a machine without a GPU.
  pip_quiet install "torch==2.14.1" "torchvision==0.29.1" "numpy<2" ninja pytest pytest-benchmark pytest-xdist hypothesis scipy faiss-cpu \
    tqdm matplotlib pyyaml
  touch "$VENV/.deps-installed"
fi
# triton 3.6.0 is the oldest supported version (the venv gets PyPI's latest with torch): scripts/test.sh
# compiles every Triton kernel with both, the old one from a side folder put first on PYTHONPATH.
export NFORMER_OLDEST_TRITON_VERSION=3.6.0 NFORMER_OLDEST_TRITON="$VENV/triton-3.6.0"
if [ ! -f "$NFORMER_OLDEST_TRITON/triton/__init__.py" ]; then
  pip_quiet install --no-deps --target "$NFORMER_OLDEST_TRITON" "triton==$NFORMER_OLDEST_TRITON_VERSION"
fi
# Compile csrc/cuda too when a CUDA toolkit is present (the GPU itself is not needed to compile).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
SITE="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -d "$SITE/nvidia/cu13/include" ]; then  # the pip CUDA headers (cusparse.h, ...) the local toolkit lacks
  export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch
print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "8.6;9.0")')}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
cd "$ROOT"
# Rebuild only when the sources changed since the last build into this venv.
STAMP="$VENV/.nformer-built"
if [ ! -f "$STAMP" ] || ! ls nformer_kernels/_C*.so >/dev/null 2>&1 || \
   [ -n "$(find csrc setup.py pyproject.toml -newer "$STAMP" -print -quit)" ]; then
  pip_quiet install --no-build-isolation -e .
  touch "$STAMP"
fi
# The extension must load, with the CUDA kernels whenever a toolkit was there to compile them.
CUDA_HOME="${CUDA_HOME:-}" python - <<'PY'
import os, sys, torch
import nformer_kernels as nk
print(f"nformer_kernels: extension {nk.extension_available()} | CUDA kernels compiled in: {nk.extension_has_cuda()}")
if not nk.extension_available():
    sys.exit("nformer_kernels: the compiled extension did not load (see the build output above)")
if os.environ["CUDA_HOME"] and torch.version.cuda and not nk.extension_has_cuda():
    sys.exit("nformer_kernels: a CUDA toolkit is present but the CUDA kernels were not compiled in")
PY
