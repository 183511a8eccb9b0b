"""The docs site as a reader meets it: headless Chromium opens pages of the site built from this run's executed
notebooks, and each must load cleanly, list every chapter, hide nbdev's directives and Jupyter's prompts, and show
the figures and numeric tables that the run produced. Screenshots are kept in the run's output folder."""
import os, re, shutil
from pathlib import Path
import pytest
from conftest import ROOT, ci_output
from efficientai.docs import chapter_title
from efficientai.notebooks import course_notebooks

NBS = ROOT / "nbs"
CHAPTERS = sorted({p.relative_to(NBS).parts[0] for p in course_notebooks(NBS) if len(p.relative_to(NBS).parts) > 1})
# One page per chapter that shows figures and tables, and one benchmark page (the home page is checked apart).
PAGES = {"00_foundation": "00_foundation/benchmark.html", "05_zoo": "05_zoo/images.html",
         "10_lora": "10_lora/compare.html", "20_quantization": "20_quantization/metrics.html",
         "30_compression": "30_compression/prune.html", "40_clip": "40_clip/recipes.html",
         "50_diffusion": "50_diffusion/samplers.html", "60_federated": "60_federated/strategies.html",
         "70_deploy": "70_deploy/load.html",
         "benchmarks": "benchmarks/matmul.html"}
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--headless=new"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name): return path
    mac = Path("/Applications/Google Chrome.app/Contents/MacOS/Google Chrome")
    return str(mac) if mac.exists() else None


@pytest.fixture(scope="module")
def browser():
    site = ci_output("site")
    exe = _chromium()
    if exe is None:
        if os.environ.get("CI") == "true": pytest.fail("no Chromium: scripts/test.sh installs Debian's `chromium`")
        pytest.skip("no Chromium or Chrome on this machine")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=BROWSER_ARGS)
        yield b, site
        b.close()


def _open(browser, rel: str):
    b, site = browser
    page, problems = b.new_page(viewport={"width": 1280, "height": 900}), []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
    page.goto((site / rel).as_uri(), wait_until="load")
    shots = ci_output("screenshots"); shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / (rel.replace("/", "-").removesuffix(".html") + ".png")), full_page=True)
    return page, problems


def _check_frame(page, problems, rel):
    assert not problems, f"{rel}: {problems}"
    listed = page.locator("nav h2").all_inner_texts()
    assert [t.lower() for t in listed] == [chapter_title(c).lower() for c in CHAPTERS], f"{rel}: sidebar lists {listed}"
    text = page.locator("main").inner_text()
    assert not re.search(r"(?m)^\s*#\|\s*[\w-]+", text), f"{rel}: an nbdev directive is visible"
    assert not re.search(r"\b(In|Out)\s*\[\s*\d*\s*\]:", text), f"{rel}: a Jupyter prompt is visible"
    assert page.locator("main header h1").inner_text().strip(), f"{rel}: no page title"


def test_home_page(browser):
    page, problems = _open(browser, "index.html")
    _check_frame(page, problems, "index.html")
    assert "EfficientAI" in page.title()


@pytest.mark.parametrize("chapter", list(PAGES))
def test_a_page_of_every_chapter_shows_its_results(browser, chapter):
    assert set(PAGES) == set(CHAPTERS), f"PAGES must name one page of each chapter: {CHAPTERS}"
    rel = PAGES[chapter]
    page, problems = _open(browser, rel)
    _check_frame(page, problems, rel)
    sizes = page.eval_on_selector_all(
        "main .output_area img, main .output_area svg",
        "els => els.map(e => e.tagName === 'IMG' ? [e.naturalWidth, e.naturalHeight]"
        "                                         : [e.getBBox().width, e.getBBox().height])")
    assert any(w > 0 and h > 0 for w, h in sizes), f"{rel}: no rendered figure among {sizes}"
    cells = page.eval_on_selector_all("main .output_area table td", "els => els.map(e => e.innerText)")
    assert any(re.fullmatch(r"\s*[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?\s*%?\s*", c) for c in cells), f"{rel}: no table of numbers"
    assert "Outputs below come from one run" in page.locator(".provenance").inner_text()
