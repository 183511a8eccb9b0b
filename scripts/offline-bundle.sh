#!/usr/bin/env bash
# Write an offline install bundle into a folder: the locked environment's wheels for a target Python and platform (this
# machine's by default), EfficientAI's own wheel, the zoo's cached models and datasets, and an install.sh that installs
# them with the package index disabled. Run `bash scripts/setup.sh` first (this uses its environment and uv).
#   bash scripts/offline-bundle.sh OUT [--cuda] [--python 3.12] [--platform manylinux_2_35_x86_64] [--no-dev]
#                                      [--zoo cached|none|NAME,...] [--offline] [--find-links DIR] [--list]
# e.g. for an NVIDIA GPU machine with CPython 3.12:  bash scripts/offline-bundle.sh gpu-bundle --cuda --python 3.12 \
#        --platform manylinux_2_35_x86_64     then carry gpu-bundle/ there and run: bash gpu-bundle/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "offline-bundle: no .venv here; run bash scripts/setup.sh first" >&2; exit 1; }
exec .venv/bin/python scripts/offline_bundle.py "$@"
