#!/usr/bin/env bash
# Set up EfficientAI on a fresh machine (idempotent): system packages, uv, the locked environment in .venv,
# and the `efficientai` Jupyter kernel. Debian/Ubuntu (as root or with sudo) and macOS.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the toolkit uses on Debian/Ubuntu: an optimised BLAS that MLX can bind to, and the zoo's
# offline data: Fashion-MNIST, colour emoji, the King James Bible, WordNet.
APT_PACKAGES="libopenblas0-pthread dataset-fashion-mnist fonts-noto-color-emoji bible-kjv wordnet-base"
if command -v apt-get >/dev/null 2>&1; then
  missing=""
  for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "== installing system packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
  fi
fi

# uv, from PyPI.
if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1; then
  echo "== installing uv"
  if [ "$(id -u)" -eq 0 ] || [ -n "${VIRTUAL_ENV:-}" ]; then python3 -m pip install -q uv
  else python3 -m pip install -q --user uv; fi
fi
UV="uv"; command -v uv >/dev/null 2>&1 || UV="python3 -m uv"

echo "== syncing the locked environment (.venv)"
$UV sync --frozen --quiet

echo "== registering the Jupyter kernel"
.venv/bin/efficientai kernel install >/dev/null
echo "== set up: $(.venv/bin/python -c 'import efficientai.backend as b; print(b.blas_status.how, "BLAS,", b.mlx_backend(), "backend")')"
