"""Notebook-first toolkit for learning and doing efficient machine learning on Apple's MLX

Modules:

- `efficientai.lora.adapters`: Turn an mlx-lm model into a trainable one by method, save what was trained in mlx-lm's own adapter format, load it back, and fuse it into a standalone model that `mlx_lm.load` opens.
- `efficientai.lora.compare`: The four methods on the same data with the same settings, in one table: task accuracy, validation loss, speed, memory, trainable parameters and adapter size on disk.
- `efficientai.lora.config`: One YAML file per fine-tuning run. The keys are mlx-lm's own (`mlx_lm.lora -c config.yaml` files work here unchanged), plus the few this chapter adds: `qlora`, `alpha`, early stopping, batching strategy, fast kernels.
- `efficientai.lora.evaluate`: Validation loss and perplexity, greedy generations before and after, and the dataset's task metric on its test split, base against tuned, in one table.
- `efficientai.lora.kernels`: MLX's CPU backend runs `exp`, `sigmoid` and attention's softmax about ten times slower than its matmuls allow. Here are drop-in replacements built from MLX's own fast elementwise ops, checked against the reference ops (values and gradients), and a context manager that swaps them into an mlx-lm model for the length of a run.
- `efficientai.lora.loss`: Next-token cross-entropy over the answer tokens, as mlx-lm computes it, but with the 49k-way output layer run only at the positions that enter the loss. Same number, a fraction of the work.
- `efficientai.lora.search`: Random search over rank, alpha, learning rate and layers that stops when the clock says so, the Pareto front of quality against trainable parameters, and the smallest adapter that is good enough.
- `efficientai.lora.train`: A compiled LoRA/DoRA/QLoRA/full training step on mlx-lm models, with gradient accumulation and checkpointing, warm-up schedules, validation, early stopping that keeps the best adapters, exact resume after a crash, a progress bar and a live loss plot.
- `efficientai.quant.kernels`: MLX's CPU `quantized_matmul` runs on one thread at ~3 GFLOP/s, so a 4-bit model decodes slower than the float one it came from. Here are C kernels that read MLX's packed weights where they lie: a fused dequantize-dot for decoding, and for prompts integer dot products on x rounded to int8 (AVX-512 VNNI or AVX2) or dequantize-then-BLAS, built on first use, checked against MLX and swapped into any mlx-lm model."""

__version__ = "0.1.0"

# Load a fast BLAS into the process before anything imports MLX, so `import efficientai` alone gives
# full-speed MLX on Linux. See nbs/00_foundation/01_backend.ipynb.
from efficientai.backend import blas_status as _blas_status  # noqa: E402,F401
