#!/usr/bin/env bash
# Set up EfficientAI on a fresh machine (idempotent): system packages, uv, the locked environment in .venv,
# and the `efficientai` Jupyter kernel. Debian/Ubuntu (as root or with sudo) and macOS.
#   bash scripts/setup.sh [--cuda | --cpu] [--dry-run]
# MLX's backend on Linux: CPU (mlx-cpu), or NVIDIA GPUs through CUDA (mlx-cuda-13, the `cuda` extra) with --cuda, with
# EFFICIENTAI_CUDA=1, or by itself where `nvidia-smi` lists a GPU; --cpu or EFFICIENTAI_CUDA=0 keeps the CPU one.
# --dry-run prints the backend and the uv command it would run, and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKEND="" DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --cuda) BACKEND=cuda ;;
    --cpu) BACKEND=cpu ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "setup: unknown option $arg (expected --cuda, --cpu or --dry-run)" >&2; exit 2 ;;
  esac
done
if [ -z "$BACKEND" ]; then
  case "${EFFICIENTAI_CUDA:-}" in
    1|true|yes) BACKEND=cuda WHY="EFFICIENTAI_CUDA=${EFFICIENTAI_CUDA}" ;;
    0|false|no) BACKEND=cpu WHY="EFFICIENTAI_CUDA=${EFFICIENTAI_CUDA}" ;;
    "") if [ "$(uname -s)" = Linux ] \
            && GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) && [ -n "$GPU" ]
        then BACKEND=cuda WHY="nvidia-smi lists $GPU"
        else BACKEND=cpu WHY="no GPU from nvidia-smi; --cuda or EFFICIENTAI_CUDA=1 picks CUDA"; fi ;;
    *) echo "setup: EFFICIENTAI_CUDA=${EFFICIENTAI_CUDA} (expected 1 or 0)" >&2; exit 2 ;;
  esac
else WHY="--$BACKEND"; fi
SYNC="sync --frozen --quiet"
if [ "$(uname -s)" = Darwin ]; then
  if [ "$BACKEND" = cuda ]; then
    echo "setup: CUDA is for Linux with an NVIDIA GPU; macOS uses Metal (leave out --cuda)" >&2; exit 2
  fi
  BACKEND=metal WHY="macOS"
elif [ "$BACKEND" = cuda ]; then SYNC="$SYNC --extra cuda --no-group cpu"; fi
echo "== MLX backend: $BACKEND ($WHY)"
if [ "$DRY_RUN" = 1 ]; then echo "would run: uv $SYNC"; exit 0; fi

# System packages the toolkit uses on Debian/Ubuntu: an optimised BLAS that MLX can bind to, a C compiler for the
# quantization chapter's CPU kernels (the server image has one too), a C++ compiler, CMake and Ninja for its MLX
# extension (the engine's fused primitives, efficientai/csrc), and the zoo's
# offline data: Fashion-MNIST, colour emoji, the King James Bible, WordNet; plus $EFFICIENTAI_EXTRA_APT (test.sh: a browser).
APT_PACKAGES="python3 ca-certificates libopenblas0-pthread gcc g++ libc6-dev cmake ninja-build dataset-fashion-mnist fonts-noto-color-emoji bible-kjv wordnet-base unicode-cldr-core openclipart-svg librsvg2-bin"
install_apt() {
  command -v apt-get >/dev/null 2>&1 || return 0
  local missing="" p
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  [ -z "$missing" ] && return 0
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup: need root or sudo to install:$missing" >&2; return 1; }
    sudo="sudo"
  fi
  echo "== installing system packages:$missing"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
}
install_apt $APT_PACKAGES ${EFFICIENTAI_EXTRA_APT:-}

# uv: the one on PATH, else our private copy, else its wheel from PyPI unpacked into that private folder by a
# standard-library script. Never `pip install` into the system Python: Debian 12, Ubuntu 24.04 and Homebrew
# mark it externally managed (PEP 668) and refuse.
UV_DIR="${EFFICIENTAI_TOOLS:-$HOME/.local/share/efficientai}/bin"
# The private copy is the version uv.lock locks (a new uv release changes nothing until the lock moves).
if command -v uv >/dev/null 2>&1; then UV=uv
elif python3 scripts/get_uv.py --check "$UV_DIR"; then UV="$UV_DIR/uv"
else
  echo "== installing uv into $UV_DIR"
  UV=$(python3 scripts/get_uv.py "$UV_DIR")
fi

echo "== syncing the locked environment (.venv)"
$UV $SYNC

echo "== registering the Jupyter kernel"
.venv/bin/efficientai kernel install >/dev/null
echo "== set up: $(.venv/bin/python -c 'import efficientai.backend as b; print(b.blas_status.how, "BLAS,", b.mlx_backend(), "backend")')"
