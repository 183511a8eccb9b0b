"""The fast-BLAS preload, checked in fresh interpreters (the only honest way: it must happen before mlx loads)."""
import json, sys
import pytest
from conftest import run

linux = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS preload is a Linux-only fix")

PROBE = """
import json, sys
{first}
import mlx.core as mx
from efficientai.backend import blas_status
a = mx.random.normal((64, 64)); mx.eval(a @ a)
libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if 'blas' in l.lower() and '/' in l})
print(json.dumps({"how": blas_status.how, "fast": blas_status.fast, "msg": blas_status.message, "libs": libs}))
"""


def probe(first: str, env=None) -> dict:
    p = run([sys.executable, "-c", PROBE.replace("{first}", first)], env=env)
    return json.loads(p.stdout.strip().splitlines()[-1])


@linux
def test_import_efficientai_first_loads_openblas_before_mlx():
    r = probe("import efficientai")
    assert r["how"] == "preloaded" and r["fast"], r
    assert any("libopenblas" in l for l in r["libs"]), r["libs"]


@linux
def test_submodule_import_alone_is_enough():
    r = probe("import efficientai.backend")
    assert r["how"] == "preloaded" and r["fast"], r


@linux
def test_importing_mlx_first_is_reported_not_hidden():
    r = probe("import mlx.core; import efficientai")
    assert r["how"] == "too-late" and not r["fast"]
    assert "import efficientai first" in r["msg"]


@linux
def test_disable_and_bad_path_are_explicit():
    assert probe("import efficientai", env={"EFFICIENTAI_BLAS": "off"})["how"] == "disabled"
    r = probe("import efficientai", env={"EFFICIENTAI_BLAS": "/nonexistent/libopenblas.so.0"})
    assert r["how"] == "failed" and "/nonexistent/libopenblas.so.0" in r["msg"] and "apt-get install" in r["msg"]


@linux
def test_ld_preload_from_kernel_is_recognised():
    from efficientai.backend import find_fast_blas
    blas = find_fast_blas()
    assert blas is not None, "libopenblas0-pthread should be installed by scripts/setup.sh"
    r = probe("import mlx.core; import efficientai", env={"LD_PRELOAD": str(blas)})
    assert r["how"] == "LD_PRELOAD" and r["fast"]
