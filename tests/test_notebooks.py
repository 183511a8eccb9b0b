"""Rules every notebook must keep, checked on the sources."""
import re
import nbformat
import pytest
from conftest import ROOT

NOTEBOOKS = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if not any(s.startswith((".", "_")) for s in p.parts))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "nbs")))
def test_efficientai_is_imported_before_mlx(nb):
    # nbdev-test and plain Python kernels run notebooks in-process: if mlx is imported before efficientai,
    # the fast BLAS can no longer be loaded and every matmul runs ~20-40x slower.
    for cell in nbformat.read(nb, 4).cells:
        if cell.cell_type != "code": continue
        for line in cell.source.splitlines():
            if re.match(r"(import|from) efficientai\b", line) or "= preload_fast_blas(" in line: return
            assert not re.match(r"(import|from) mlx(_lm)?\b", line), f"{nb.name}: `{line}` runs before any `import efficientai`"
