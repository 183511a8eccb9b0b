"""The docs: site config valid for Quarto users, the offline site built from this run's executed notebooks, README
generated from index.ipynb."""
from conftest import ROOT, ci_output
from efficientai.docs import check_quarto_yml, readme_text
from efficientai.notebooks import course_notebooks


def test_quarto_yml_is_a_valid_site_config():
    cfg = check_quarto_yml(ROOT / "_quarto.yml")
    assert cfg["project"]["type"] == "website"
    assert (ROOT / "nbs" / "_quarto.yml").resolve() == (ROOT / "_quarto.yml").resolve()


def test_readme_is_generated_from_index_notebook():
    assert (ROOT / "README.md").read_text() == readme_text(ROOT)
    text = readme_text(ROOT)
    assert "bash scripts/run.sh" in text and "bash scripts/test.sh" in text


def test_site_has_a_page_per_notebook_with_api_docs_and_outputs():
    site = ci_output("site")
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    assert len(pages) == len(course_notebooks(ROOT / "nbs")), sorted(pages)
    for folder, names in {"00_foundation": ("errors", "backend", "notebooks", "docs"),
                          "05_zoo": ("cache", "text", "llm", "minilm", "tiny", "images", "instruct", "catalog"),
                          "10_lora": ("config", "data", "kernels", "train", "evaluate", "search", "compare", "cli"),
                          "20_quantization": ("ptq", "metrics", "mixed", "calibrated", "qat", "kernels", "export", "cli"),
                          "30_compression": ("train", "prune", "structured", "lowrank", "distill", "deploy", "pipeline"),
                          "benchmarks": ("lora", "matmul", "quantization", "compression")}.items():
        for name in names: assert f"{folder}/{name}.html" in pages
    for page, api in [("05_zoo/llm.html", "convert_gguf"), ("10_lora/kernels.html", "fast_kernels"),
                      ("20_quantization/ptq.html", "QuantSpec"), ("30_compression/pipeline.html", "run_pipeline"),
                      ("00_foundation/backend.html", "preload_fast_blas")]:
        assert api in (site / page).read_text(), f"{page} lacks the API docs of {api}"
    backend = (site / "00_foundation" / "backend.html").read_text()
    assert "GFLOP/s, ratio" in backend              # an executed cell's output, from the one run
