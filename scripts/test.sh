#!/usr/bin/env bash
# Sets up .venv (scripts/env.sh), then runs the whole test suite and the benchmark suites once (no timing asserts).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
python -m pytest tests bench -q --benchmark-disable -p no:cacheprovider "$@"
