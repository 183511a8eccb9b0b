#!/usr/bin/env bash
# The main job on embedded defaults: set up, show the platform/backend/BLAS, then a quick LoRA fine-tune of
# SmolLM2-135M-Instruct on the zoo's kjv-cite instruction set, and base vs tuned on held-out examples; then
# SmolLM2 quantized to 4 bits (an mlx-lm folder in runs/smollm2-q4), scored against the float model; then the
# Fashion-MNIST CNN pruned, distilled and quantized, every stage measured (runs/fashion-cnn-compressed).
# Re-running resumes (or, once finished, just re-evaluates) the run in runs/lora-quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/efficientai info
.venv/bin/efficientai lora train --iters 60 --adapter-path runs/lora-quick --eval 50 "$@"
.venv/bin/efficientai quant run smollm2-135m-instruct --spec q4 --out runs/smollm2-q4 --eval-tokens 2048
.venv/bin/efficientai compress run fashion-cnn --pipeline "prune=0.5@300,distill@300,quantize=q8g32" --out runs/fashion-cnn-compressed
