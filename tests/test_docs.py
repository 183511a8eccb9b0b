"""The docs: site config valid for Quarto users, offline HTML build, README generated from index.ipynb."""
from conftest import ROOT, run
from efficientai.docs import check_quarto_yml, readme_text


def test_quarto_yml_is_a_valid_site_config():
    cfg = check_quarto_yml(ROOT / "_quarto.yml")
    assert cfg["project"]["type"] == "website"
    assert (ROOT / "nbs" / "_quarto.yml").resolve() == (ROOT / "_quarto.yml").resolve()


def test_readme_is_generated_from_index_notebook():
    assert (ROOT / "README.md").read_text() == readme_text(ROOT)
    text = readme_text(ROOT)
    assert "bash scripts/run.sh" in text and "bash scripts/test.sh" in text


def test_offline_site_renders_every_chapter_page(cli, tmp_path):
    # Chapters' notebooks are executed by nbdev-test already; here we check that every page renders.
    out = tmp_path / "site"
    cli("docs", "build", "--out", str(out), "--no-execute")
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    for name in ("cache", "text", "llm", "minilm", "tiny", "images", "instruct", "catalog"):
        assert f"05_zoo/{name}.html" in pages
    assert "convert_gguf" in (out / "05_zoo" / "llm.html").read_text()
    for name in ("config", "data", "kernels", "loss", "adapters", "train", "evaluate", "search", "compare", "cli"):
        assert f"10_lora/{name}.html" in pages
    assert "fast_kernels" in (out / "10_lora" / "kernels.html").read_text()
    for name in ("ptq", "metrics", "mixed", "calibrated", "qat", "kernels", "export", "cli"):
        assert f"20_quantization/{name}.html" in pages
    assert "QuantSpec" in (out / "20_quantization" / "ptq.html").read_text()
    for name in ("train", "prune", "structured", "lowrank", "distill", "deploy", "pipeline", "cli"):
        assert f"30_compression/{name}.html" in pages
    assert "run_pipeline" in (out / "30_compression" / "pipeline.html").read_text()


def test_offline_site_build_executes_and_renders_every_page(cli, tmp_path):
    out = tmp_path / "site"
    cli("docs", "build", "--out", str(out), "--skip", "benchmarks", "--skip", "05_zoo", "--skip", "10_lora",
        "--skip", "20_quantization", "--skip", "30_compression")
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    for name in ("errors", "backend", "config", "logging", "io", "benchmark", "plotting", "cli", "docs"):
        assert f"00_foundation/{name}.html" in pages
    backend = (out / "00_foundation" / "backend.html").read_text()
    assert "preload_fast_blas" in backend          # API docs from show_doc
    assert "GFLOP/s, ratio" in backend              # an executed cell's output
    assert "index.html" in pages
