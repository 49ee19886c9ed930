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
if [ ! -f "$VENV/.deps-installed" ] || [ "$ROOT/scripts/env.sh" -nt "$VENV/.deps-installed" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  # torch 2.14.1 is the CUDA 13 build: its headers let CI compile csrc/cuda even on a machine without a GPU.
  python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "numpy<2" ninja pytest pytest-benchmark scipy \
    faiss-cpu tqdm matplotlib pyyaml
  touch "$VENV/.deps-installed"
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
python -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "^\s*$" || true
python -c "import nformer_kernels as nk; print('nformer_kernels: extension', nk.extension_available(), '| CUDA kernels compiled in:', nk.extension_has_cuda())"
