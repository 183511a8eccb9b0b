"""The quantization chapter's C kernels as native code: checked arguments, one thread pool shared safely by every caller,
and a second compiler (clang, as on macOS) building a library that passes the kernel notebook's exactness checks."""
import os, shutil, subprocess, sys, textwrap

import efficientai  # noqa: F401  (first: loads fast BLAS before mlx)
import numpy as np
import mlx.core as mx
import pytest

from efficientai.errors import ConfigError, ToolkitError
from efficientai.quant import kernels as qk

from conftest import BIN, broken_compiler


def test_scales_of_another_group_size_are_refused_not_misread():
    "A 4-bit g64 weight passed as g32: MLX refuses it, and so must the kernels (they used to return finite garbage)."
    w = mx.random.normal((64, 256)) * 0.05
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((3, 256))
    with pytest.raises(ValueError):
        mx.eval(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=4))
    with pytest.raises(ConfigError, match=r"scales .*groups of 32") as e:
        qk.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
    assert "(64, 8)" in str(e.value) and "(64, 4)" in str(e.value), e.value   # expected vs got
    with pytest.raises(ConfigError, match="biases"):
        qk.dequantize(wq, s, b[:, :2], group_size=64, bits=4)
    with pytest.raises(ConfigError, match="scales"):
        qk.quantized_matmul(x, wq, s.astype(mx.int32), b, group_size=64, bits=4)
    # the raw entry: numpy x of the wrong dtype, width or layout never reaches C
    kern, stack = qk.load_kernels(), qk._Stack([qk._weights(wq, s, b, 64, 4)])
    for bad in (np.zeros((2, 256)), np.zeros((2, 128), np.float32), np.zeros((256, 2), np.float32).T):
        with pytest.raises(ConfigError, match="x"):
            kern.matmul(bad, stack)
    part = qk._weights(wq, s, b, 64, 4)
    part.s = part.s[:, :2]                                          # a view that no longer matches its layout
    with pytest.raises(ToolkitError, match=r"parts\[0\]\.s"):
        qk._Stack([part])


HAMMER = textwrap.dedent("""
    import efficientai, sys, threading
    import numpy as np, mlx.core as mx
    from efficientai.quant.kernels import load_kernels, _Stack, _weights
    k1 = load_kernels(threads=4)                  # a fresh process: this starts the library's pool with 4 threads
    k2 = load_kernels(rebuild=True)               # rebuilt in place: the same library, a second Kernels object
    assert k1 is not k2 and k1.lib._handle == k2.lib._handle and k1.threads == 4
    mx.random.seed(0)
    cases = []
    for bits, gs, m in ((4, 32, 1), (4, 64, 5), (8, 64, 40), (2, 32, 3), (4, 32, 64), (8, 32, 12)):
        wq, s, b = mx.quantize(mx.random.normal((384, 512)) * 0.05, group_size=gs, bits=bits)
        cases.append((np.array(mx.random.normal((m, 512))), (wq, s, b, gs, bits)))
    def run(k, x, args):
        stack = _Stack([_weights(*args, kernels=k)])
        return np.array(k.matmul(x, stack)[0]), k.dequantize(stack)
    ref = [run(k1, *c) for c in cases]            # one thread at a time
    wrong, done = [], []
    def hammer(k, seed):
        r = np.random.default_rng(seed)
        for _ in range(300):
            i = int(r.integers(len(cases)))
            y, d = run(k, *cases[i])
            if not (np.array_equal(y, ref[i][0]) and np.array_equal(d, ref[i][1])): wrong.append(i)
        done.append(seed)
    ts = [threading.Thread(target=hammer, args=(k, seed), daemon=True) for seed, k in enumerate((k1, k2))]
    for t in ts: t.start()
    for t in ts: t.join(60)
    print(f"finished {len(done)} of 2, wrong results {len(wrong)}", flush=True)
    sys.exit(0 if len(done) == 2 and not wrong else 1)
""")


def test_two_threads_and_two_kernels_objects_share_the_pool_exactly():
    "Two Python threads on two `Kernels` of one library (the second from rebuild=True): the single-thread results."
    p = subprocess.run([str(BIN / "python"), "-c", HAMMER], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "finished 2 of 2, wrong results 0" in p.stdout, p.stdout + p.stderr[-3000:]


def _int8_x(x: np.ndarray, gs: int) -> np.ndarray:
    "x as the int8 prompt path sees it: rounded per row and group of `gs` to steps of max|x| / 127 (the notebook's)."
    g = x.reshape(x.shape[0], -1, gs)
    amax = np.abs(g).max(-1, keepdims=True)
    inv = (np.float32(127) / np.where(amax > 0, amax, 1)) * (amax > 0)
    return (np.rint(g * inv) * (amax / np.float32(127))).astype(np.float32).reshape(x.shape)


def test_a_clang_build_passes_the_notebooks_exactness_checks():
    "The kernels built by clang (Apple's compiler is one) against MLX, on every prompt path and layout, as the notebook."
    clang = shutil.which("clang")
    if clang is None:
        if os.environ.get("CI") == "true": pytest.fail("CI installs clang (scripts/test.sh): it is missing")
        pytest.skip("clang is not installed (Debian: apt-get install clang)")
    kern = qk.Kernels(qk.build_kernels(compiler=clang), threads=2)   # its own library, pool and path (the key has cc)
    assert kern.path.exists() and kern.lanes in (8, 16)
    mx.random.seed(1)
    for path in kern.available_prompt_paths():
        kern.prompt = path
        for bits in (2, 4, 8):
            for gs in (32, 64, 128):
                wq, s, b = mx.quantize(mx.random.normal((200, 1536)) * 0.05, group_size=gs, bits=bits)
                dense = mx.dequantize(wq, s, b, group_size=gs, bits=bits)
                stack = qk._Stack([qk._weights(wq, s, b, gs, bits, kernels=kern)])
                np.testing.assert_allclose(kern.dequantize(stack), np.array(dense), atol=1e-6)
                for m in (1, 3, 128):
                    x = mx.random.normal((m, 1536))
                    got = np.array(kern.matmul(np.array(x), stack)[0])
                    int8 = path == "int8" and m > kern.small_m and kern.int8_supported(bits, gs)
                    ref = (_int8_x(np.array(x), gs) if int8 else np.array(x)) @ np.array(dense).T
                    ref_q = np.array(mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits))
                    scale = np.abs(ref).max()
                    assert np.abs(got - ref).max() <= 1e-5 * scale, (path, bits, gs, m)
                    assert np.abs(got - ref_q).max() <= (2e-2 if int8 else 1e-5) * scale, (path, bits, gs, m)


def test_prompt_path_leaves_the_kernels_alone_off_the_cpu(monkeypatch, tmp_path):
    "Where MLX computes on a GPU, `prompt_path` (which the compression chapter's measure enters) builds nothing."
    monkeypatch.setenv("EFFICIENTAI_CACHE", str(tmp_path))
    monkeypatch.setattr(qk, "_KERNELS", None)
    monkeypatch.setattr(qk, "on_cpu", lambda: False)   # this machine has no GPU: ask as one would
    with qk.prompt_path("float") as k:
        assert k is None
    assert qk._KERNELS is None and not (tmp_path / "kernels").exists()
    assert qk.kernels_status().startswith("not used (MLX computes on")


def test_a_failed_build_runs_the_compiler_once_and_says_why(monkeypatch, tmp_path):
    "A broken toolchain: one compile per process (not one per call), and `kernels_status` (efficientai info) tells why."
    broken_compiler(monkeypatch, tmp_path, "CC", "qkernels.c:9: error: no stdint.h")
    monkeypatch.setattr(qk, "_KERNELS", None)
    assert qk.kernels_status().startswith("not built yet")
    for _ in range(3):
        with qk.prompt_path("float") as k:             # what the compression chapter's measure() enters every time
            assert k is None
    compiles = [c for c in (tmp_path / "cc.calls").read_text().splitlines() if "--version" not in c]
    assert len(compiles) == 1, compiles
    assert "failed" in qk.kernels_status() and "error: no stdint.h" in qk.kernels_status()


def test_status_reads_a_failed_build_marker_left_by_another_process(monkeypatch, tmp_path):
    "A `.failed` marker from another process (none in this one's record), even an empty one, is reported, not a crash."
    cc = broken_compiler(monkeypatch, tmp_path, "CC", "qkernels.c:9: Error: bad flag")
    monkeypatch.setattr(qk, "_KERNELS", None)
    folder, key = qk._kernels_folder(None), qk.kernel_key(str(cc))
    marker = folder / f"qkernels-{key}.failed"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("cc -O3 qkernels.c\nqkernels.c:9: Error: bad flag\n")
    assert "failed" in qk.kernels_status() and "Error: bad flag" in qk.kernels_status()
    marker.write_text("")
    assert "failed" in qk.kernels_status() and "(no message)" in qk.kernels_status()
