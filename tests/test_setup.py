"""The README's set-up on a stock system: the first `python3` on PATH is the system one, which refuses
`pip install` (PEP 668, "externally managed" on Debian 12, Ubuntu 24.04 and Homebrew), and there is no uv."""
import json, os, re, subprocess, sys, sysconfig
from pathlib import Path
import pytest
from conftest import BIN, ROOT, run

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


def test_the_private_uv_is_the_locked_one(tmp_path):
    "A new uv release must change nothing: get_uv installs the version uv.lock locks, which the Dockerfile's image carries."
    sys.path.insert(0, str(ROOT / "scripts"))
    try: import get_uv
    finally: sys.path.pop(0)
    locked = get_uv.locked_version()
    assert locked and re.fullmatch(r"\d+\.\d+\.\d+", locked), locked
    assert f"FROM ghcr.io/astral-sh/uv:{locked} " in (ROOT / "Dockerfile").read_text()
    tag = get_uv.platform_tags()[0]
    files = [{"filename": f"uv-{v}-py3-none-{tag}.whl", "url": v} for v in ("0.1.0", locked, "99.0.0")]
    files.append({"filename": f"uv-{locked}-py3-none-{tag}.tar.gz", "url": "sdist"})
    assert get_uv.pick_wheel(files, [tag], locked)["url"] == locked
    assert get_uv.pick_wheel(files, [tag])["url"] == "99.0.0"            # EFFICIENTAI_UV_VERSION=latest
    with pytest.raises(SystemExit, match="no uv 98.0.0 wheel"): get_uv.pick_wheel(files, [tag], "98.0.0")
    fake = tmp_path / "uv"                           # a private copy of another version is not kept
    fake.write_text(f"#!/bin/sh\necho uv 99.0.0\n"); fake.chmod(0o755)
    assert get_uv.installed_version(fake) == "99.0.0"
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "get_uv.py"), "--check", str(tmp_path)])
    assert check.returncode == 1
    fake.write_text(f"#!/bin/sh\necho uv {locked}\n")
    assert subprocess.run([sys.executable, str(ROOT / "scripts" / "get_uv.py"), "--check", str(tmp_path)]).returncode == 0


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


# ---- the offline bundle (issue 19 item 4): wheels, the project, the zoo, an install.sh with the index disabled ----
BUNDLE = ["bash", "scripts/offline-bundle.sh"]


def test_offline_bundle_picks_the_wheels_of_the_target(tmp_path):
    "The plan (`--list`) here and for a CUDA machine with CPython 3.12: every locked package, one wheel each."
    here = run([*BUNDLE, str(tmp_path / "b"), "--list"]).stdout.splitlines()
    names = {l.split("-")[0].lower() for l in here}
    locked = {n.replace("-", "_").lower() for n in _locked()} | {"uv"}
    assert len(here) == len(names) and names <= locked and {"mlx", "mlx_cpu", "mlx_lm", "numpy", "uv"} <= names
    gpu = run([*BUNDLE, str(tmp_path / "b"), "--list", "--cuda", "--python", "3.12",
               "--platform", "manylinux_2_35_x86_64"]).stdout
    wheels = [l.split("\t")[0] for l in gpu.splitlines()]
    assert "mlx-0.32.4-cp312-cp312-manylinux_2_35_x86_64.whl" in wheels
    assert "mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl" in wheels
    assert not any(w.startswith("mlx_cpu") for w in wheels) and any(w.startswith("nvidia_cudnn_cu13") for w in wheels)
    assert all("-cp311-cp311-" not in w and "macosx" not in w and "win" not in w.split("-")[-1] for w in wheels)
    mac = run([*BUNDLE, str(tmp_path / "b"), "--list", "--cuda", "--platform", "macosx_14_0_arm64"], check=False)
    assert mac.returncode == 1 and "--cuda needs a Linux target" in mac.stderr
    assert not (tmp_path / "b").exists()                             # --list writes nothing


def _no_network() -> list[str]:
    "A command prefix that runs without any network (a fresh network namespace), or [] where unshare can't."
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0: return prefix
    return []


# CI installs a bounded bundle: the packages `import efficientai` and `efficientai info` load, with everything they
# need by the lock (6 wheels), uv's own wheel, the project's wheel and a zoo entry. EFFICIENTAI_BUNDLE_TEST=full
# bundles and installs the whole locked environment instead (~1.5 GB; about 90 s here).
_FULL = os.environ.get("EFFICIENTAI_BUNDLE_TEST") == "full"
_ROOTS = "mlx,mlx-cpu,numpy,pyyaml,psutil,tqdm"


def test_offline_bundle_installs_with_no_index_and_no_network(tmp_path):
    from efficientai.zoo.cache import ZooEntry, fetch_entry
    src_cache, dst_cache = tmp_path / "zoo-here", tmp_path / "zoo-there"
    def build(folder: Path) -> None: (folder / "numbers.txt").write_text("1 2 3\n")
    fetch_entry(ZooEntry("numbers", "dataset", "CC0", "this test", "three numbers", build), root=src_cache)
    out = tmp_path / "bundle"
    args = [*BUNDLE, str(out), "--offline", "--no-compress"] + ([] if _FULL else ["--only", _ROOTS])
    made = run(args, env={"EFFICIENTAI_CACHE": str(src_cache)}, timeout=900)   # from uv's cache: no download
    assert "zoo: numbers" in made.stdout
    info = json.loads((out / "bundle.json").read_text())
    assert {w["from"] for w in info["wheels"].values()} == {"uv-cache"} and set(info["zoo"]) == {"numbers"}
    assert (out / "zoo" / "datasets" / "numbers" / "zoo.json").exists()
    assert (out / "wheels" / info["project_wheel"]).exists()

    # The other machine: no network at all where unshare can make that so, no uv on PATH (install.sh takes the one in
    # the bundle), a fresh uv cache, the index disabled by install.sh itself; the same Python version.
    env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path / "home"), "EFFICIENTAI_CACHE": str(dst_cache),
           "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "UV_LINK_MODE": "hardlink",
           "PYTHON": str(Path(sys.executable).resolve()), "LANG": "C.UTF-8"}
    if not (prefix := _no_network()):
        env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", ALL_PROXY="http://127.0.0.1:9")
    venv = tmp_path / "there" / ".venv"
    p = run([*prefix, "bash", str(out / "install.sh"), str(venv)], env=env, cwd=tmp_path, timeout=900)
    assert "backend CPU" in p.stdout and "MLX       0.32.4" in p.stdout      # `efficientai info` from the new venv
    check = ("import efficientai, mlx.core as mx; from efficientai.zoo.cache import verify_entry, cache_root; "
             "print(efficientai.__file__, mx.array([1, 2]).sum().item(), "
             "verify_entry(cache_root() / 'datasets/numbers', full=True))")
    got = run([*prefix, str(venv / "bin" / "python"), "-c", check], env=env, cwd=tmp_path).stdout.split()
    assert got[0].startswith(str(venv)) and got[1:] == ["3", "[]"]            # installed there, not this checkout
