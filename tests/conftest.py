import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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
