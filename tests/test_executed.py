"""The one execution of every notebook (scripts/test.sh runs them with `efficientai notebooks run`), checked here.

This is what `nbdev-test` and nbval used to do by running the notebooks again: a chapter notebook's asserts passed,
and a benchmark notebook ran to its end with its quick parameters, with no error in any cell."""
import json
import nbformat, pytest, yaml
from conftest import ROOT, ci_output
from efficientai.notebooks import course_notebooks

NBS = ROOT / "nbs"
NOTEBOOKS = [p.relative_to(NBS).as_posix() for p in course_notebooks(NBS)]
BENCHMARKS = [n for n in NOTEBOOKS if n.startswith("benchmarks/")]


@pytest.fixture(scope="module")
def records() -> dict:
    f = ci_output("executed", "notebooks.json")
    assert f.exists(), f"{f} is missing: `efficientai notebooks run --out {f.parent}` did not finish"
    return {r["name"]: r for r in json.loads(f.read_text())}


def test_every_notebook_ran_once_and_passed(records):
    assert sorted(records) == sorted(NOTEBOOKS), "the run and the course disagree on which notebooks there are"
    failed = {n: r["error"][-500:] for n, r in records.items() if not r["ok"]}
    assert not failed, failed


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_ran_to_the_end_with_its_quick_parameters(name, records):
    nb = nbformat.read(ci_output("executed", name), as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    quick = yaml.safe_load((NBS / "benchmarks" / "quick" / name.split("/")[-1].replace(".ipynb", ".yaml")).read_text())
    meta = nb.metadata["efficientai"]
    assert meta["parameters"] == quick and meta["parameter_source"].endswith(f"quick/{name.split('/')[-1][:-6]}.yaml")
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1, "papermill's injected-parameters cell is missing"
    last = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()][-1]
    assert last.get("outputs") or meta["ok"], "the last cell did not run"
