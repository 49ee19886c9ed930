#!/usr/bin/env bash
# Sets up .venv (scripts/env.sh), then runs the end-to-end demo on built-in synthetic data (no downloads).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
nformer-reid demo "$@"
