import hashlib, json, os, resource, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The CI run's output folder (scripts/test.sh sets it): executed notebooks, the built site, timings, screenshots.
CI_OUT = Path(os.environ["EFFICIENTAI_CI_OUT"]).resolve() if os.environ.get("EFFICIENTAI_CI_OUT") else None
# The same names as efficientai.notebooks.THREAD_VARS, not imported from there: importing efficientai loads the BLAS,
# which must find these variables (and the CPU affinity) already set when pytest_configure pins an xdist worker.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def run(args, env=None, cwd=ROOT, check=True, timeout=900):
    "Run a command from the project's environment; returns the CompletedProcess."
    e = {k: v for k, v in os.environ.items() if not k.startswith("EFFICIENTAI_")}
    e.update(env or {})
    p = subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture
def cli():
    return lambda *a, **kw: run([str(BIN / "efficientai"), *a], **kw)


def broken_compiler(monkeypatch, tmp_path: Path, env_var: str, message: str) -> Path:
    """A compiler that logs its arguments to `<path>.calls`, prints `message` to stderr and fails, named by `env_var`
    ($CC, $CXX), with the toolkit's cache (where builds and their failure markers go) under `tmp_path`."""
    cc = tmp_path / {"CC": "cc", "CXX": "c++"}.get(env_var, env_var.lower())
    cc.write_text(f'#!/bin/sh\necho "$@" >> "$0.calls"\necho "{message}" >&2\nexit 1\n')
    cc.chmod(0o755)
    monkeypatch.setenv(env_var, str(cc))
    monkeypatch.setenv("EFFICIENTAI_CACHE", str(tmp_path / "cache"))
    return cc


def ci_output(*parts: str) -> Path:
    "A path in the CI run's output folder; skips the test outside such a run, fails it when CI=true."
    if CI_OUT is None:
        if os.environ.get("CI") == "true": pytest.fail("EFFICIENTAI_CI_OUT is not set: run the suite with scripts/test.sh")
        pytest.skip("needs the executed notebooks and site of a scripts/test.sh run (EFFICIENTAI_CI_OUT)")
    return CI_OUT.joinpath(*parts)


def pytest_configure(config):
    # Under pytest-xdist (-n 2) each worker gets its own share of the CPUs, and its subprocesses inherit it: two
    # BLAS pools spinning on the same cores make each other 10-20x slower (see efficientai.notebooks).
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cpus, slot = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
        mine = cpus[slot * len(cpus) // count:(slot + 1) * len(cpus) // count] or cpus[:1]
        os.sched_setaffinity(0, mine)
        os.environ.update({v: str(len(mine)) for v in THREAD_VARS})


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    # The controller (not an xdist worker) writes every test's seconds for the slowest-15 table.
    if CI_OUT is not None and not os.environ.get("PYTEST_XDIST_WORKER") and _durations:
        CI_OUT.mkdir(parents=True, exist_ok=True)
        (CI_OUT / "pytest-durations.json").write_text(json.dumps({k: round(v, 2) for k, v in _durations.items()}, indent=1))


def full_disk_run(args, max_file_bytes: int):
    "Run `args` as `run` does, but no file it writes may grow past `max_file_bytes`: a disk that fills up mid-save."
    e = {k: v for k, v in os.environ.items() if not k.startswith("EFFICIENTAI_")}
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    return subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=900, preexec_fn=limit)


def digests(folder: Path) -> dict:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def pytest_terminal_summary(terminalreporter):
    # The fuzz suite's count of cases per format (test_fuzz.py records them; xdist carries user_properties over).
    lines = [v for r in terminalreporter.getreports("passed") + terminalreporter.getreports("failed")
             for k, v in getattr(r, "user_properties", []) if k == "fuzz" and r.when == "call"]
    if lines:
        terminalreporter.write_sep("-", "fuzz cases per format")
        for line in sorted(lines): terminalreporter.write_line(line)
