"""The README's set-up on a stock system: the first `python3` on PATH is the system one, which refuses
`pip install` (PEP 668, "externally managed" on Debian 12, Ubuntu 24.04 and Homebrew), and there is no uv."""
import os, sysconfig, subprocess
from pathlib import Path
import pytest
from conftest import ROOT, run

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _system_python_is_externally_managed() -> bool:
    code = "import sysconfig, pathlib; print(pathlib.Path(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED').exists())"
    p = subprocess.run(["/usr/bin/env", "python3", "-c", code], env={"PATH": SYSTEM_PATH}, capture_output=True, text=True)
    return p.returncode == 0 and p.stdout.strip() == "True"


def test_setup_with_the_system_python_first_on_path(tmp_path):
    if not _system_python_is_externally_managed():
        if os.environ.get("CI") == "true" and Path("/etc/debian_version").exists():
            pytest.fail("expected Debian's externally managed python3 in /usr/bin on the CI machine")
        pytest.skip("this machine's system python3 is not externally managed (PEP 668)")
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    refused = subprocess.run(["python3", "-m", "pip", "install", "--dry-run", "uv"], env=env, capture_output=True, text=True)
    assert refused.returncode != 0    # what the old set-up did, and why it failed on stock systems
    p = run(["bash", "scripts/setup.sh"], env=env, timeout=600)
    uv = tmp_path / ".local" / "share" / "efficientai" / "bin" / "uv"
    assert f"installing uv into {uv.parent}" in p.stdout and uv.exists()
    assert run([str(uv), "--version"], env=env).stdout.startswith("uv ")
    assert "cpu backend" in p.stdout or "metal backend" in p.stdout or "cuda backend" in p.stdout
    again = run(["bash", "scripts/setup.sh"], env=env, timeout=600)       # idempotent: the private uv is reused
    assert "installing uv" not in again.stdout
