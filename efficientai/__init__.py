__version__ = "0.1.0"

# Load a fast BLAS into the process before anything imports MLX, so `import efficientai` alone gives
# full-speed MLX on Linux. See nbs/00_foundation/01_backend.ipynb.
from efficientai.backend import blas_status as _blas_status  # noqa: E402,F401
