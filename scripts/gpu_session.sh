#!/usr/bin/env bash
# For a session lent a GPU machine (torch + triton preinstalled, no network): build for the visible
# GPU, run the GPU test suite, then the benchmark sweeps, writing everything under $OUT.
# Usage: OUT=/path bash scripts/gpu_session.sh [build] [test] [bench] [tune] [bench-half]   (default: all)
# Where the copy on the device has no .git, put NFORMER_GIT_COMMIT=<hash sent> in front so results name it.
# Each stage fits one 10-minute device call and returns at most 8 files (the device tool's limit);
# ignored build outputs persist on a warm machine. With ~30 device-minutes a session, run them in
# this order of priority: build+test first (they verify the kernels), then bench, tune, bench-half.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?set OUT to the folder that comes back}"
cd "$ROOT"
PY="${PYTHON:-python3}"  # the GPU machines have python3 (the one with torch), maybe no python
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test bench tune bench-half)
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -d "$SITE/nvidia/cu13/include" ] && export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONPATH="$ROOT:$ROOT/python"
mkdir -p "$OUT"
sweep() {  # dtype, time budget (s)
  "$PY" -m bench run --device cuda --dtype "$1" \
    --n-list 1000,2000,5000,10000,19281,50000,93820,200000,500000,1000000 \
    --repeats 5 --warmup 2 --repeat-budget-s 10 --timeout-s 60 --time-budget-s "$2" --results-root "$OUT/results"
}
for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      { nvidia-smi; "$PY" -c 'import torch, triton; print(torch.__version__, triton.__version__)';
        echo "commit ${NFORMER_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; } \
        > "$OUT/device.txt" 2>&1 || true
      "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      "$PY" -c 'import torch, nformer_kernels as nk; print("cuda kernels:", nk.extension_has_cuda(), "| auto backend:", nk.get_backend(torch.device("cuda")))' | tee -a "$OUT/device.txt" ;;
    test)
      "$PY" -m pytest tests/test_gpu.py tests/test_ops.py tests/test_modules.py -q -p no:cacheprovider \
        --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.log" 2>&1 || true
      tail -5 "$OUT/gpu-tests.log" ;;
    bench) sweep float32 480 > "$OUT/bench-fp32.log" 2>&1; tail -3 "$OUT/bench-fp32.log" ;;
    bench-half) sweep float16 480 > "$OUT/bench-fp16.log" 2>&1; tail -3 "$OUT/bench-fp16.log" ;;
    tune)  # launch-configuration grids of the Triton kernels: 3 x (JSON + Markdown) + one log
      # ~65 knn bf16 configurations (compiles dominate, ~4 s each), 37 attention ones, 12 fp32 knn ones.
      for spec in "knn bfloat16 0" "attention bfloat16 0" "knn float32 12"; do
        read -r kernel dtype most <<<"$spec"
        "$PY" -m bench tune --kernel "$kernel" --dtype "$dtype" --n 100000 --max-configs "$most" --out "$OUT" \
          >> "$OUT/tune.log" 2>&1 || echo "tune $kernel $dtype failed (see tune.log)"
      done
      grep -A3 "^| variant" "$OUT/tune.log" || true ;;
    *) echo "unknown stage $stage (build|test|bench|tune|bench-half)"; exit 2 ;;
  esac
done
