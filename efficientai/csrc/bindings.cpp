// Python bindings of the engine's ops (nanobind, in MLX's NB_DOMAIN so arrays cross as mx.array).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "engine.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_efficientai_engine, m) {
  m.doc() = "efficientai's fused, multithreaded CPU primitives for MLX";
  m.def("rms_norm", &efficientai::rms_norm, "x"_a, "weight"_a, "eps"_a,
        "x * rsqrt(mean(x**2, -1) + eps) * weight, as mx.fast.rms_norm (float32 inside)");
  m.def("rope", &efficientai::rope, "x"_a, "dims"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a,
        "rotary position embedding over the last axis, positions along axis -2, as mx.fast.rope");
  m.def("rope_at", &efficientai::rope_at, "x"_a, "dims"_a, "traditional"_a, "base"_a, "scale"_a, "offset"_a,
        "rope with the offset an integer array of one element, read when the graph runs");
  m.def("swiglu", &efficientai::swiglu, "gate"_a, "up"_a, "silu(gate) * up");
  m.def("attention", &efficientai::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a,
        "softmax(scale * q @ k.T [causal, bottom-right aligned]) @ v with grouped KV heads, "
        "as mx.fast.scaled_dot_product_attention");
  m.def("attention_masked", &efficientai::attention_masked, "q"_a, "k"_a, "v"_a, "scale"_a, "mask"_a,
        "attention with a boolean mask broadcastable to (L, S), the same for every batch row and head");
  m.def("linear", &efficientai::linear, "x"_a, "weight"_a, "bias"_a = nb::none(),
        "x @ weight.T (+ bias) for x of few rows and weight (N, K) (float32, bfloat16 or float16), read in place");
  m.def("quantized_matmul", &efficientai::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, "[x @ dequantize(w_i, scales_i, biases_i).T] for MLX affine-quantized matrices that share x, "
        "on the quantization chapter's fused GEMV (meant for few rows of x)");
  m.def("quantized_supported", &efficientai::quantized_supported, "k"_a, "bits"_a, "group_size"_a,
        "whether quantized_matmul runs this layout (K inputs, bits, group size)");
  m.def("lora_add", &efficientai::lora_add, "x"_a, "y"_a, "a"_a, "b"_a, "scale"_a,
        "y + scale * (x @ a) @ b for float32 x (..., K), y (..., M), a (K, r), b (r, M): a LoRA layer's update in "
        "one pass over the rows (and one backward)");
  m.def("cross_entropy", &efficientai::cross_entropy, "logits"_a, "targets"_a,
        "per-row logsumexp(logits) - logits[target] for float32 logits (N, V) and integer targets (N,)");
  m.def("cross_entropy_grad", &efficientai::cross_entropy_grad, "logits"_a, "targets"_a, "ce"_a, "c"_a,
        "c * (softmax(logits) - onehot(targets)) per row, the softmax from ce + logits[target]");
  m.def("threads", &efficientai::engine_threads, "threads the engine's pool runs on");
  m.def("set_threads", &efficientai::set_engine_threads, "n"_a, "resize the pool (n <= 0: the usable CPUs)");
}
