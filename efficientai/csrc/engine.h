// Fused, multithreaded CPU primitives for MLX: RMSNorm, RoPE, SwiGLU, causal GQA attention and a few-row linear
// (GEMV), each one node of
// MLX's graph (a custom mlx::core::Primitive) whose eval_cpu splits rows over a small thread pool.
// Built by efficientai.quant.engine (nbs/20_quantization/08_engine.ipynb); follows MLX's examples/extensions.
#pragma once

#include <functional>
#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace efficientai {

// ---------------------------------------------------------------- thread pool
// threads the pool runs on: the process's usable CPUs (its affinity), or $EFFICIENTAI_ENGINE_THREADS
int engine_threads();
void set_engine_threads(int n);   // resize the pool (n <= 0: back to the default)
// fn(task) for task in [0, ntasks), spread over the pool; the calling thread works too
void parallel_tasks(int ntasks, const std::function<void(int)>& fn);

// ---------------------------------------------------------------- ops
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps);
mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, int offset);
// the same with the offset an integer array of one element (a compiled decode step's position), read at eval time
mx::array rope_at(const mx::array& x, int dims, bool traditional, float base, float scale, const mx::array& offset);
mx::array swiglu(const mx::array& gate, const mx::array& up);
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal);
// the same with a boolean mask broadcastable to (L, S) (True: attend), e.g. a fixed-size KV buffer's written prefix
mx::array attention_masked(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           const mx::array& mask);
// x @ weight.T (+ bias) for x (..., K) of few rows and weight (N, K) as nn.Linear stores it (float32, bfloat16 or
// float16), read in place; float32 inside, the result in the inputs' promoted dtype
mx::array linear(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& bias);
// x @ dequantize(w_i).T for each of a few MLX affine-quantized matrices read by the same x (q/k/v, gate/up): uint32
// codes of `bits` (2, 4, 8) in groups of `group_size`, float scales and biases, as nn.QuantizedLinear stores them.
// The quantization chapter's fused dequantize-dot GEMV (efficientai/quant/qkernels.c) on the engine's pool, one output
// per matrix in x's and the scales' promoted dtype; differentiable in x. qk_supported(K, bits, group_size) == 0: the
// layouts it runs.
std::vector<mx::array> quantized_matmul(const mx::array& x, const std::vector<mx::array>& w,
                                        const std::vector<mx::array>& scales, const std::vector<mx::array>& biases,
                                        int group_size, int bits);
bool quantized_supported(int k, int bits, int group_size);
// y + scale * (x @ a) @ b: a LoRA layer's low-rank update added to its frozen product y = x @ W.T, for float32 x
// (..., K), y (..., M), a (K, r), b (r, M). One pass over the rows forward, one backward (dx, da, db together):
// BLAS runs these rank-r products (a dimension of 8) far below its speed, each a separate pass over x or y.
mx::array lora_add(const mx::array& x, const mx::array& y, const mx::array& a, const mx::array& b, float scale);
// per-row cross-entropy of float32 logits (N, V) against integer targets (N,): logsumexp(row) - row[target] (NaN for a
// target outside [0, V)); and its gradient for the logits given each row's cotangent c (N,):
// c * (softmax(row) - onehot(target)), the softmax from logsumexp = ce + row[target]. Rows split over the pool; no
// VJP of their own (lora.loss.head_cross_entropy wraps them in a custom function).
mx::array cross_entropy(const mx::array& logits, const mx::array& targets);
mx::array cross_entropy_grad(const mx::array& logits, const mx::array& targets, const mx::array& ce, const mx::array& c);

// ---------------------------------------------------------------- primitives
class EnginePrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("efficientai engine primitives run on the CPU only");
  }
};

class RMSNorm : public EnginePrimitive {
 public:
  RMSNorm(mx::Stream s, float eps) : EnginePrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineRMSNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;
 private:
  float eps_;
};

class RMSNormVJP : public EnginePrimitive {   // (x, w, g) -> (dx, dw)
 public:
  RMSNormVJP(mx::Stream s, float eps) : EnginePrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineRMSNormVJP"; }
 private:
  float eps_;
};

class RoPE : public EnginePrimitive {
 public:
  RoPE(mx::Stream s, int dims, bool traditional, float base, float scale, int offset, bool forward)
      : EnginePrimitive(s), dims_(dims), traditional_(traditional), base_(base), scale_(scale), offset_(offset),
        forward_(forward) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineRoPE"; }
  bool is_equivalent(const mx::Primitive& other) const override;
 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
  int offset_;     // added to the offset input, when there is one (inputs: x[, int32 offset])
  bool forward_;   // false: the inverse rotation (the VJP)
};

class SwiGLU : public EnginePrimitive {
 public:
  using EnginePrimitive::EnginePrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineSwiGLU"; }
  bool is_equivalent(const mx::Primitive& other) const override { return typeid(other) == typeid(*this); }
};

class SwiGLUVJP : public EnginePrimitive {    // (gate, up, dy) -> (dgate, dup)
 public:
  using EnginePrimitive::EnginePrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineSwiGLUVJP"; }
};

class Attention : public EnginePrimitive {
 public:
  Attention(mx::Stream s, float scale, bool causal) : EnginePrimitive(s), scale_(scale), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;
 private:
  float scale_;
  bool causal_;
};

class AttentionVJP : public EnginePrimitive {   // (q, k, v, dout[, mask]) -> (dq, dk, dv)
 public:
  AttentionVJP(mx::Stream s, float scale, bool causal) : EnginePrimitive(s), scale_(scale), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineAttentionVJP"; }
 private:
  float scale_;
  bool causal_;
};

class Gemv : public EnginePrimitive {   // (x, w[, bias]) -> x @ w.T (+ bias), split over output rows
 public:
  using EnginePrimitive::EnginePrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineGemv"; }
  bool is_equivalent(const mx::Primitive& other) const override { return typeid(other) == typeid(*this); }
};

class QuantizedGemv : public EnginePrimitive {   // (x, w_0..w_n-1, s_0.., b_0..) -> (x @ W_0.T, ..., x @ W_n-1.T)
 public:
  QuantizedGemv(mx::Stream s, int group_size, int bits) : EnginePrimitive(s), group_size_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineQuantizedGemv"; }
  bool is_equivalent(const mx::Primitive& other) const override;
 private:
  int group_size_, bits_;
};

class LoraAdd : public EnginePrimitive {   // (x, y, a, b) -> y + scale * (x @ a) @ b
 public:
  LoraAdd(mx::Stream s, float scale) : EnginePrimitive(s), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineLoraAdd"; }
  bool is_equivalent(const mx::Primitive& other) const override;
 private:
  float scale_;
};

class LoraAddVJP : public EnginePrimitive {   // (x, a, b, dout) -> (dx, da, db) of the update
 public:
  LoraAddVJP(mx::Stream s, float scale) : EnginePrimitive(s), scale_(scale) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineLoraAddVJP"; }
  bool is_equivalent(const mx::Primitive& other) const override;
 private:
  float scale_;
};

class CrossEntropy : public EnginePrimitive {   // (logits, targets) -> ce
 public:
  using EnginePrimitive::EnginePrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineCrossEntropy"; }
  bool is_equivalent(const mx::Primitive& other) const override { return typeid(other) == typeid(*this); }
};

class CrossEntropyGrad : public EnginePrimitive {   // (logits, targets, ce, c) -> dlogits
 public:
  using EnginePrimitive::EnginePrimitive;
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "EngineCrossEntropyGrad"; }
  bool is_equivalent(const mx::Primitive& other) const override { return typeid(other) == typeid(*this); }
};

}  // namespace efficientai
