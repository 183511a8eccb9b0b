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


def _is_import(line: str) -> bool:
    return bool(re.match(r"(import|from)\s+\S+", line)) or not line.strip() or line.lstrip().startswith("#")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "nbs")))
def test_import_cells_hold_only_imports(nb):
    # nbdev's docs processing executes every cell that imports something, out of order: a cell that mixes
    # imports with other code breaks the docs build (names from earlier cells are not defined there).
    for i, cell in enumerate(nbformat.read(nb, 4).cells):
        if cell.cell_type != "code" or cell.source.startswith("#| export"): continue
        lines = cell.source.splitlines()
        top_imports = [l for l in lines if re.match(r"(import|from)\s+\S+", l)]
        if top_imports:
            assert all(_is_import(l) for l in lines if not l.startswith((" ", "\t", ")"))), \
                f"{nb.name} cell {i}: imports mixed with other code: {cell.source[:120]!r}"
