"""The engine's MLX extension as native code: a broken toolchain falls back to MLX's ops (one build attempt per
process, and `engine_status` says why), nothing is built off the CPU, and the primitives compose with `mx.compile`
(the decode path compiles the model's step) exactly as MLX's own ops do."""
import efficientai  # noqa: F401  (first: loads fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import pytest

from efficientai.errors import DependencyError
from efficientai.quant import engine as E
from efficientai.zoo.tiny import TinyLMConfig, build_tiny_lm

from conftest import broken_compiler

# tests of the engine's own ops skip where it is switched off or can't run ($EFFICIENTAI_ENGINE=0: the suite's fallback
# run); the build, the off-CPU and the switched-off tests below run everywhere
needs_engine = pytest.mark.skipif(E.engine_ops() is None, reason=f"the engine doesn't run here: {E.engine_status()}")


def test_a_failed_build_is_tried_once_says_why_and_falls_back_to_mlx(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFICIENTAI_ENGINE", raising=False)
    cxx = broken_compiler(monkeypatch, tmp_path, "CXX", "engine.cpp:1: error: no <thread>")
    monkeypatch.setattr(E, "_ENGINE", None)
    monkeypatch.setattr(E, "_UNAVAILABLE", None)
    assert E.engine_status().startswith("not built yet")
    x, w = mx.random.normal((3, 8)), mx.random.normal((8,))
    for _ in range(3):                                 # every op asks for the engine; the build runs once
        assert E.engine_ops() is None
        assert mx.array_equal(E.rms_norm(x, w), mx.fast.rms_norm(x, w, 1e-5))
        assert mx.array_equal(E.swiglu(x, x), nn.silu(x) * x)
    assert E.use_engine(build_tiny_lm(TinyLMConfig(num_hidden_layers=1))) == 0
    calls = (tmp_path / "c++.calls").read_text().splitlines()
    assert any("CMakeCXXCompilerId" in c for c in calls)        # cmake tried the compiler once...
    with pytest.raises(DependencyError, match="failed"):
        E.build_engine()                                         # (the same error at once, from this process's record)
    E.engine_ops(); E.rms_norm(x, w)
    assert (tmp_path / "c++.calls").read_text().splitlines()[len(calls):] == ["--version"]  # ...and not again
    assert next((tmp_path / "cache" / "kernels").glob("engine-*.failed")).read_text()
    status = E.engine_status()
    assert "failed" in status and str(cxx) in status, status


def test_nothing_is_built_off_the_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv("EFFICIENTAI_ENGINE", raising=False)
    monkeypatch.setenv("EFFICIENTAI_CACHE", str(tmp_path))
    monkeypatch.setattr(E, "_ENGINE", None)
    monkeypatch.setattr(E, "_UNAVAILABLE", None)
    monkeypatch.setattr(E, "on_cpu", lambda: False)    # this machine has no GPU: ask as one would
    assert E.engine_ops() is None and E.use_engine(nn.Sequential(nn.RMSNorm(4))) == 0
    assert not (tmp_path / "kernels").exists()
    assert E.engine_status().startswith("not used (MLX computes on")


@needs_engine
def test_the_primitives_compile_and_match_mlx_inside_a_compiled_step():
    assert E.engine_ops() is not None, E.engine_status()
    mx.random.seed(3)
    q, k, v = mx.random.normal((1, 4, 6, 16)), mx.random.normal((1, 2, 6, 16)), mx.random.normal((1, 2, 6, 16))
    w = mx.random.normal((16,))

    def step(q, k, v, fast):
        if fast:
            h = E.attention(E.rope(q, 16, True, 1e4, 1.0, 2), k, v, scale=0.25, mask="causal")
            return E.swiglu(E.rms_norm(h, w), h)
        h = mx.fast.scaled_dot_product_attention(mx.fast.rope(q, 16, traditional=True, base=1e4, scale=1.0, offset=2),
                                                 k, v, scale=0.25, mask="causal")
        return nn.silu(mx.fast.rms_norm(h, w, 1e-5)) * h

    ref = step(q, k, v, False)
    compiled = mx.compile(lambda q, k, v: step(q, k, v, True))
    for _ in range(2):                                 # traced once, then replayed
        assert mx.allclose(compiled(q, k, v), ref, atol=1e-5)
    g = mx.grad(mx.compile(lambda q: step(q, k, v, True).sum()))(q)
    assert mx.allclose(g, mx.grad(lambda q: step(q, k, v, False).sum())(q), atol=1e-4)


@needs_engine
def test_use_engine_gemv_inside_the_compiled_decode_step_keeps_mlx_lms_greedy_tokens():
    """The decode path's one-token linears (and the tied output layer) run on the engine's GEMV inside
    `compile_decode`'s traced step, and the greedy tokens and logits are plain mlx-lm's."""
    from mlx_lm.models.cache import make_prompt_cache
    from efficientai.quant.decode import fast_decode
    assert E.engine_ops() is not None, E.engine_status()
    model = build_tiny_lm(TinyLMConfig(num_hidden_layers=2))
    prompt = mx.random.randint(3, 500, (1, 20), key=mx.random.key(5))

    def greedy(m, n=6):
        cache = make_prompt_cache(m)
        y, out = mx.argmax(m(prompt, cache=cache)[:, -1], -1), []
        for _ in range(n):
            logits = m(y[:, None], cache=cache)[:, -1]
            y = mx.argmax(logits, -1)
            out.append(logits)
        return mx.concatenate(out)

    plain = greedy(model)
    assert E.use_engine(model) == 2 * (5 + 7) + 2
    assert type(model.layers[0].self_attn.q_proj) is E.EngineLinear
    gemv_calls = []
    ops = E.engine_ops()

    class Counting:                                    # count the GEMV nodes built while tracing (no mock: real op)
        def __getattr__(self, name): return getattr(ops, name)
        def linear(self, *a): gemv_calls.append(a[0].shape); return ops.linear(*a)

    E._ENGINE = Counting()
    try:
        with fast_decode(model):
            fast = greedy(model)
            assert model._decoder.calls == 6
    finally:
        E._ENGINE = ops
        E.restore(model)
    assert len(gemv_calls) >= 2 * 7 + 1                # traced once: every block linear and the output layer
    assert mx.array_equal(mx.argmax(fast, -1), mx.argmax(plain, -1))
    assert mx.allclose(fast, plain, atol=1e-4, rtol=1e-4), float(mx.abs(fast - plain).max())


@needs_engine
def test_use_engine_after_compile_decode_traces_the_step_again():
    """A model already decoding on the compiled step and then routed through the engine must decode on the engine:
    MLX caches the traced step by input shapes, so without a new trace the old ops would stay (silently)."""
    from mlx_lm.models.cache import make_prompt_cache
    from efficientai.quant.decode import compile_decode, restore_decode
    assert E.engine_ops() is not None, E.engine_status()
    model = build_tiny_lm(TinyLMConfig(num_hidden_layers=2))
    prompt = mx.random.randint(3, 500, (1, 20), key=mx.random.key(6))

    def greedy(m, n=3):
        cache = make_prompt_cache(m)
        y = mx.argmax(m(prompt, cache=cache)[:, -1], -1)
        for _ in range(n): y = mx.argmax(m(y[:, None], cache=cache)[:, -1], -1)
        mx.eval(y)

    assert compile_decode(model)
    greedy(model)                                      # the step is traced on MLX's own ops
    gemv_calls, ops = [], E.engine_ops()

    class Counting:                                    # count the GEMV nodes built while tracing (no mock: real op)
        def __getattr__(self, name): return getattr(ops, name)
        def linear(self, *a): gemv_calls.append(a[0].shape); return ops.linear(*a)

    E._ENGINE = Counting()
    try:
        assert E.use_engine(model) > 0
        greedy(model)                                  # the prompt (20 rows) takes sgemm; the steps the GEMV
        assert model._decoder.calls == 3
    finally:
        E._ENGINE = ops
        E.restore(model)
        restore_decode(model)
    assert len(gemv_calls) >= 2 * 7 + 1, len(gemv_calls)


def test_switched_off_every_op_is_mlxs_and_routed_quantized_layers_fall_back(monkeypatch):
    """$EFFICIENTAI_ENGINE=0: the ops are MLX's own (same values), `use_engine` changes nothing, and a quantized model
    routed while the engine ran decodes on its layers' own paths again, with no compiled step left counting on the
    engine (its kernel layers are back outside the graph)."""
    from efficientai.quant.decode import _host_layers, compile_decode
    from efficientai.quant.kernels import accelerate, restore as restore_kernels
    model = build_tiny_lm(TinyLMConfig(num_hidden_layers=1)); nn.quantize(model, group_size=64, bits=4)
    x = mx.random.normal((1, 1, 128), key=mx.random.key(2))
    ref = model(mx.array([[5, 7, 9]]))
    routed = E.use_engine(model)                      # 0 where the engine doesn't run at all
    kernels = accelerate(model)
    monkeypatch.setenv("EFFICIENTAI_ENGINE", "0")
    assert E.engine_ops() is None and E.engine_status().startswith("switched off")
    w, s, b = mx.quantize(mx.random.normal((64, 128), key=mx.random.key(3)), group_size=64, bits=4)
    assert mx.array_equal(E.quantized_matmul(x, w, s, b), mx.quantized_matmul(x, w, s, b, transpose=True))
    assert mx.array_equal(E.rms_norm(x, x[0, 0]), mx.fast.rms_norm(x, x[0, 0], 1e-5))
    assert E.use_engine(build_tiny_lm(TinyLMConfig(num_hidden_layers=1))) == 0
    assert mx.allclose(model(mx.array([[5, 7, 9]])), ref, atol=0.05)     # (the kernels' int8 prompt path rounds x)
    if kernels:
        assert _host_layers(model) == kernels and not compile_decode(model)
    restore_kernels(model)
    if routed: E.restore(model)
    assert type(model.layers[0].mlp.up_proj) is nn.QuantizedLinear
