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


# ---- the MLX backend on Linux: CPU by default, CUDA as the `cuda` extra (issue 19 item 3) ----
UV = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "uv")


def _locked(*args: str) -> dict[str, str]:
    "name -> marker of every package `uv export` takes from the lock with these selection flags."
    flags = ["--frozen", "--offline", "--no-hashes", "--no-header", "--no-annotate", "--no-emit-project"]
    out = run([UV, "export", *flags, *args]).stdout
    lines = [l.split(";", 1) for l in out.splitlines() if "==" in l and not l.lstrip().startswith("#")]
    return {spec.split("==")[0].strip(): (rest[0].strip() if rest else "") for spec, *rest in lines}


def test_the_lock_holds_a_cuda_backend_beside_the_cpu_one():
    run([UV, "lock", "--check", "--offline"])                     # uv.lock is current with pyproject.toml
    cpu, cuda = _locked(), _locked("--extra", "cuda", "--no-group", "cpu")
    assert "mlx-cpu" in cpu and "mlx-cuda-13" not in cpu          # `uv sync` (CI, setup.sh): the CPU backend only
    assert "mlx-cuda-13" in cuda and "mlx-cpu" not in cuda        # both wheels write mlx/lib: never together
    assert "sys_platform == 'linux'" in cuda["mlx-cuda-13"] and "nvidia-cublas" in cuda
    assert set(cpu) - {"mlx-cpu"} <= set(cuda)                    # the rest of the environment is the same
    both = run([UV, "export", "--frozen", "--offline", "--extra", "cuda"], check=False)
    assert both.returncode != 0 and "incompatible" in both.stderr  # why setup.sh passes --no-group cpu


def _setup_plan(tmp_path, *args, env=None, smi=None) -> list[str]:
    "What `setup.sh --dry-run` prints: the backend and the uv command. `smi`: a stand-in nvidia-smi's script."
    path = "/usr/sbin:/usr/bin:/sbin:/bin"
    if smi is not None:
        bin_ = tmp_path / "bin"; bin_.mkdir(exist_ok=True)
        (bin_ / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n"); (bin_ / "nvidia-smi").chmod(0o755)
        path = f"{bin_}:{path}"
    p = run(["bash", "scripts/setup.sh", "--dry-run", *args], env={"PATH": path, **(env or {})})
    return p.stdout.splitlines()


def test_setup_picks_the_cuda_backend_by_flag_variable_or_nvidia_smi(tmp_path):
    cpu_cmd = "would run: uv sync --frozen --quiet"
    cuda_cmd = f"{cpu_cmd} --extra cuda --no-group cpu"
    plan = lambda *a, **kw: _setup_plan(tmp_path, *a, **kw)
    assert plan() == ["== MLX backend: cpu (no GPU from nvidia-smi; --cuda or EFFICIENTAI_CUDA=1 picks CUDA)", cpu_cmd]
    assert plan("--cuda") == ["== MLX backend: cuda (--cuda)", cuda_cmd]
    assert plan(env={"EFFICIENTAI_CUDA": "1"}) == ["== MLX backend: cuda (EFFICIENTAI_CUDA=1)", cuda_cmd]
    gpu = 'echo "NVIDIA H100 80GB HBM3"'
    assert plan(smi=gpu) == ["== MLX backend: cuda (nvidia-smi lists NVIDIA H100 80GB HBM3)", cuda_cmd]
    assert plan(smi="exit 9")[1] == cpu_cmd                       # nvidia-smi there but no driver/GPU: CPU
    assert plan(smi=gpu, env={"EFFICIENTAI_CUDA": "0"})[1] == cpu_cmd
    assert plan("--cpu", smi=gpu)[1] == cpu_cmd
    bad = run(["bash", "scripts/setup.sh", "--dry-run", "--gpu"], check=False)
    assert bad.returncode == 2 and "unknown option --gpu" in bad.stderr
