#!/usr/bin/env bash
# The main job on embedded defaults: set up, show the platform/backend/BLAS, then a quick LoRA fine-tune of
# SmolLM2-135M-Instruct on the zoo's kjv-cite instruction set, and base vs tuned on held-out examples; then
# SmolLM2 at 4 bits, plain rounding (RTN) next to AWQ, the quantization chapter's best 4-bit recipe, scored against the
# float model in one table (runs/smollm2-q4-compare), and the AWQ model saved as an mlx-lm folder (runs/smollm2-q4); then the
# Fashion-MNIST CNN pruned, distilled and quantized, every stage measured (runs/fashion-cnn-compressed).
# Re-running resumes (or, once finished, just re-evaluates) the run in runs/lora-quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/efficientai info
.venv/bin/efficientai lora train --iters 60 --adapter-path runs/lora-quick --eval 50 "$@"
.venv/bin/efficientai quant compare smollm2-135m-instruct --specs q4 --methods rtn,awq --tokens 2048 --fast --out runs/smollm2-q4-compare
.venv/bin/efficientai quant run smollm2-135m-instruct --method awq --spec q4 --out runs/smollm2-q4
.venv/bin/efficientai compress run fashion-cnn --pipeline "prune=0.5@300,distill@300,quantize=q8g32" --out runs/fashion-cnn-compressed
