#!/usr/bin/env bash
# The main job on embedded defaults: set up, show the platform/backend/BLAS, run the matmul benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/efficientai info
.venv/bin/efficientai bench matmul "$@"
