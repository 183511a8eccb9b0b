// Fused, multithreaded CPU primitives for MLX (see engine.h). Every kernel computes in float32; ops cast other float
// dtypes in and out around the primitive. Inputs may be strided views (mlx-lm's transposed heads, a KV cache's slice):
// each kernel reads rows through their offsets, and copies only when the last axis itself is strided.
#include "engine.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

// The quantization chapter's kernels (efficientai/quant/qkernels.c, compiled into this module with QK_EXTERNAL_POOL):
// their work items run on the engine's pool through efficientai_parallel_items, defined below.
extern "C" {
typedef void (*qk_task_fn)(void* ctx, int item);
void efficientai_parallel_items(int nitems, qk_task_fn fn, void* ctx);
int qk_supported(int K, int bits, int gs);
int qk_matmul(const float* x, int M, int K, int nseg, const void* const* w, const float* const* s,
              const float* const* b, const int* n, int bits, int gs, float* const* y, float* scratch, int block,
              int small_m);
}

namespace efficientai {

// ================================================================ thread pool
namespace {

int usable_cpus() {
  if (const char* env = std::getenv("EFFICIENTAI_ENGINE_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Workers spin for a short while after a job before sleeping, and the caller spins until its job is done: a decode
// step is hundreds of small ops back to back, and a condition variable's wake-up (tens of microseconds) would cost
// more than many of them take.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Pool {
 public:
  explicit Pool(int threads) {
    if (const char* env = std::getenv("EFFICIENTAI_ENGINE_SPIN_US")) spin_ = std::chrono::microseconds(std::atoi(env));
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> l(m_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return int(workers_.size()) + 1; }

  void run(int ntasks, const std::function<void(int)>& fn) {
    if (ntasks <= 0) return;
    if (ntasks == 1 || workers_.empty()) {
      for (int t = 0; t < ntasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_m_);
    {
      std::lock_guard<std::mutex> l(m_);
      job_ = &fn;
      ntasks_ = ntasks;
      next_.store(0);
      active_.store(int(workers_.size()));
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    while (active_.load(std::memory_order_acquire) != 0) cpu_relax();
    job_ = nullptr;
  }

 private:
  std::chrono::microseconds spin_{50};   // $EFFICIENTAI_ENGINE_SPIN_US: how long a worker spins before it sleeps
  void work() {
    for (int t; (t = next_.fetch_add(1)) < ntasks_;) (*job_)(t);
  }
  void loop() {
    uint64_t seen = 0;
    while (true) {
      auto until = std::chrono::steady_clock::now() + spin_;
      while (generation_.load(std::memory_order_acquire) == seen && !stop_.load() &&
             std::chrono::steady_clock::now() < until)
        cpu_relax();
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> l(m_);
        cv_.wait(l, [&] { return stop_.load() || generation_.load() != seen; });
      }
      if (stop_.load()) return;
      seen = generation_.load(std::memory_order_acquire);
      work();
      active_.fetch_sub(1, std::memory_order_release);
    }
  }
  std::vector<std::thread> workers_;
  std::mutex m_, run_m_;
  std::condition_variable cv_;
  const std::function<void(int)>* job_ = nullptr;
  int ntasks_ = 0;
  std::atomic<int> next_{0}, active_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

std::mutex pool_m;
std::unique_ptr<Pool> pool_;

Pool& pool() {
  std::lock_guard<std::mutex> l(pool_m);
  if (!pool_) pool_ = std::make_unique<Pool>(usable_cpus());
  return *pool_;
}

// Split [0, n) into about `threads * per_thread` contiguous ranges (at least `grain` items each) and run fn on them.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& fn, int per_thread = 1) {
  if (n <= 0) return;
  int64_t tasks = std::min<int64_t>((n + grain - 1) / grain, int64_t(pool().threads()) * per_thread);
  tasks = std::max<int64_t>(tasks, 1);
  int64_t step = (n + tasks - 1) / tasks;
  std::function<void(int)> f = [&](int t) {
    int64_t b = t * step, e = std::min(n, b + step);
    if (b < e) fn(b, e);
  };
  pool().run(int(tasks), f);
}

// exp(x) for float32 in a form the compiler vectorizes (Cephes' expf polynomial, ~1 ulp); x is clamped to [-87, 88].
inline float fast_exp(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

// Row starts of an evaluated array seen as (rows, last axis); `copy` holds a packed copy when the last axis is strided.
struct Rows {
  const float* data = nullptr;
  std::vector<int64_t> offsets;
  std::vector<float> copy;
  int64_t n = 0, d = 0;
  const float* row(int64_t r) const { return data + offsets[r]; }
};

Rows rows_of(const mx::array& a) {
  Rows out;
  out.d = a.ndim() ? a.shape(-1) : 1;
  out.n = out.d ? int64_t(a.size()) / out.d : 0;
  out.offsets.resize(out.n);
  const float* base = a.data<float>();
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  int nd = int(a.ndim());
  bool packed_last = nd == 0 || strides[nd - 1] == 1 || out.d == 1;
  if (a.flags().row_contiguous) {
    for (int64_t r = 0; r < out.n; ++r) out.offsets[r] = r * out.d;
    out.data = base;
    return out;
  }
  for (int64_t r = 0; r < out.n; ++r) {
    int64_t idx = r, off = 0;
    for (int ax = nd - 2; ax >= 0; --ax) {
      off += (idx % shape[ax]) * strides[ax];
      idx /= shape[ax];
    }
    out.offsets[r] = off;
  }
  out.data = base;
  if (!packed_last) {   // gather the strided last axis into a packed copy
    int64_t s = strides[nd - 1];
    out.copy.resize(out.n * out.d);
    for (int64_t r = 0; r < out.n; ++r)
      for (int64_t j = 0; j < out.d; ++j) out.copy[r * out.d + j] = base[out.offsets[r] + j * s];
    for (int64_t r = 0; r < out.n; ++r) out.offsets[r] = r * out.d;
    out.data = out.copy.data();
  }
  return out;
}

mx::Stream cpu_stream() { return mx::default_stream(mx::Device::cpu); }

void check_float(const mx::array& a, const char* what) {
  if (!mx::issubdtype(a.dtype(), mx::floating))
    throw std::invalid_argument(std::string("efficientai engine: ") + what + " must be a floating-point array");
}

mx::array as_f32(const mx::array& a, mx::Stream s) {
  return a.dtype() == mx::float32 ? a : mx::astype(a, mx::float32, s);
}

mx::array back_to(const mx::array& a, mx::Dtype dtype, mx::Stream s) {
  return dtype == mx::float32 ? a : mx::astype(a, dtype, s);
}

void alloc(mx::array& out) { out.set_data(mx::allocator::malloc(out.nbytes())); }

}  // namespace

int engine_threads() { return pool().threads(); }

void set_engine_threads(int n) {
  std::lock_guard<std::mutex> l(pool_m);
  pool_ = std::make_unique<Pool>(n > 0 ? n : usable_cpus());
}

void parallel_tasks(int ntasks, const std::function<void(int)>& fn) { pool().run(ntasks, fn); }

// ================================================================ RMSNorm
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  check_float(x, "x");
  if (x.ndim() == 0 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1))
    throw std::invalid_argument("efficientai engine rms_norm: weight must have shape (x.shape[-1],)");
  auto s = cpu_stream();
  auto out = mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(s, eps),
                       {as_f32(x, s), as_f32(weight, s)});
  return back_to(out, x.dtype(), s);
}

void RMSNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(inputs[0]);
  enc.set_input_array(inputs[1]);
  enc.set_output_array(out);
  enc.dispatch([x = inputs[0], w = inputs[1], o = out.data<float>(), eps = eps_]() {
    Rows xr = rows_of(x), wr = rows_of(w);
    const float* wp = wr.row(0);
    int64_t d = xr.d;
    parallel_for(xr.n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* xp = xr.row(r);
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < d; ++j) ss += xp[j] * xp[j];
        float inv = 1.0f / std::sqrt(ss / float(d) + eps);
        float* op = o + r * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) op[j] = wp[j] * (xp[j] * inv);
      }
    });
  });
}

std::vector<mx::array> RMSNorm::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto& x = primals[0];
  const auto& w = primals[1];
  auto grads = mx::array::make_arrays({x.shape(), w.shape()}, {mx::float32, mx::float32},
                                      std::make_shared<RMSNormVJP>(stream(), eps_),
                                      {x, w, as_f32(cotangents[0], stream())});
  std::vector<mx::array> vjps;
  for (int a : argnums) vjps.push_back(grads[a]);
  return vjps;
}

bool RMSNorm::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const RMSNorm*>(&other);
  return o && o->eps_ == eps_;
}

void RMSNormVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& dx = outputs[0];
  auto& dw = outputs[1];
  alloc(dx);
  alloc(dw);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(dx);
  enc.set_output_array(dw);
  enc.dispatch([x = inputs[0], w = inputs[1], g = inputs[2], dxp = dx.data<float>(), dwp = dw.data<float>(),
                eps = eps_]() {
    Rows xr = rows_of(x), wr = rows_of(w), gr = rows_of(g);
    const float* wp = wr.row(0);
    int64_t d = xr.d, n = xr.n;
    int tasks = int(std::max<int64_t>(1, std::min<int64_t>(n, engine_threads())));
    std::vector<float> partial(size_t(tasks) * d, 0.0f);   // each task's share of dw
    int64_t step = (n + tasks - 1) / tasks;
    parallel_tasks(tasks, [&](int t) {
      float* acc = partial.data() + size_t(t) * d;
      for (int64_t r = t * step; r < std::min(n, (t + 1) * step); ++r) {
        const float* xp = xr.row(r);
        const float* gp = gr.row(r);
        float ss = 0.0f, gwx = 0.0f;
#pragma omp simd reduction(+ : ss, gwx)
        for (int64_t j = 0; j < d; ++j) {
          ss += xp[j] * xp[j];
          gwx += gp[j] * wp[j] * xp[j];
        }
        float inv = 1.0f / std::sqrt(ss / float(d) + eps);
        float c = inv * inv * inv * gwx / float(d);
        float* op = dxp + r * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          op[j] = inv * gp[j] * wp[j] - c * xp[j];
          acc[j] += gp[j] * xp[j] * inv;
        }
      }
    });
    for (int64_t j = 0; j < d; ++j) {
      float s = 0.0f;
      for (int t = 0; t < tasks; ++t) s += partial[size_t(t) * d + j];
      dwp[j] = s;
    }
  });
}

// ================================================================ RoPE
mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, int offset) {
  check_float(x, "x");
  if (x.ndim() < 2 || dims <= 0 || dims % 2 || dims > x.shape(-1))
    throw std::invalid_argument("efficientai engine rope: needs x of rank >= 2 and an even dims <= x.shape[-1]");
  auto s = cpu_stream();
  auto out = mx::array(x.shape(), mx::float32,
                       std::make_shared<RoPE>(s, dims, traditional, base, scale, offset, true), {as_f32(x, s)});
  return back_to(out, x.dtype(), s);
}

mx::array rope_at(const mx::array& x, int dims, bool traditional, float base, float scale, const mx::array& offset) {
  check_float(x, "x");
  if (x.ndim() < 2 || dims <= 0 || dims % 2 || dims > x.shape(-1))
    throw std::invalid_argument("efficientai engine rope: needs x of rank >= 2 and an even dims <= x.shape[-1]");
  if (offset.size() != 1 || !mx::issubdtype(offset.dtype(), mx::integer))
    throw std::invalid_argument("efficientai engine rope: an array offset must be one integer");
  auto s = cpu_stream();
  auto out = mx::array(x.shape(), mx::float32, std::make_shared<RoPE>(s, dims, traditional, base, scale, 0, true),
                       {as_f32(x, s), mx::astype(mx::reshape(offset, {1}, s), mx::int32, s)});
  return back_to(out, x.dtype(), s);
}

void RoPE::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  const int32_t* off_in = inputs.size() > 1 ? inputs[1].data<int32_t>() : nullptr;
  enc.dispatch([x = inputs[0], o = out.data<float>(), dims = dims_, trad = traditional_, base = base_,
                scale = scale_, offset0 = offset_, off_in, fwd = forward_]() {
    int64_t offset = offset0 + (off_in ? int64_t(*off_in) : 0);
    Rows xr = rows_of(x);
    int64_t d = xr.d, L = x.shape(-2), half = dims / 2;
    // the angles of every position, once: cos/sin tables of (L, dims / 2)
    std::vector<float> cs(size_t(L * half)), sn(size_t(L * half));
    float log_base = std::log2(base);
    parallel_for(L, 64, [&](int64_t b, int64_t e) {
      for (int64_t l = b; l < e; ++l) {
        float pos = scale * float(offset + l);
        for (int64_t i = 0; i < half; ++i) {
          float inv_freq = std::exp2(-float(i) * log_base / float(half));
          float theta = pos * inv_freq;
          cs[l * half + i] = std::cos(theta);
          sn[l * half + i] = fwd ? std::sin(theta) : -std::sin(theta);
        }
      }
    });
    parallel_for(xr.n, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* xp = xr.row(r);
        float* op = o + r * d;
        const float* c = cs.data() + (r % L) * half;
        const float* sv = sn.data() + (r % L) * half;
        if (trad) {
          for (int64_t i = 0; i < half; ++i) {
            float x1 = xp[2 * i], x2 = xp[2 * i + 1];
            op[2 * i] = x1 * c[i] - x2 * sv[i];
            op[2 * i + 1] = x1 * sv[i] + x2 * c[i];
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            float x1 = xp[i], x2 = xp[i + half];
            op[i] = x1 * c[i] - x2 * sv[i];
            op[i + half] = x1 * sv[i] + x2 * c[i];
          }
        }
        for (int64_t j = dims; j < d; ++j) op[j] = xp[j];
      }
    });
  });
}

std::vector<mx::array> RoPE::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                 const std::vector<int>& argnums, const std::vector<mx::array>&) {
  // a rotation's transpose is the rotation by minus the angle; an offset input gets a zero cotangent
  const auto& g = cotangents[0];
  std::vector<mx::array> ins = {as_f32(g, stream())};
  if (primals.size() > 1) ins.push_back(primals[1]);
  auto dx = mx::array(g.shape(), mx::float32,
                      std::make_shared<RoPE>(stream(), dims_, traditional_, base_, scale_, offset_, !forward_), ins);
  std::vector<mx::array> vjps;
  for (int a : argnums) vjps.push_back(a == 0 ? dx : mx::zeros_like(primals[a], stream()));
  return vjps;
}

bool RoPE::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const RoPE*>(&other);
  return o && o->dims_ == dims_ && o->traditional_ == traditional_ && o->base_ == base_ && o->scale_ == scale_ &&
         o->offset_ == offset_ && o->forward_ == forward_;
}

// ================================================================ SwiGLU
mx::array swiglu(const mx::array& gate, const mx::array& up) {
  check_float(gate, "gate");
  check_float(up, "up");
  if (gate.shape() != up.shape())
    throw std::invalid_argument("efficientai engine swiglu: gate and up must have the same shape");
  auto s = cpu_stream();
  auto dtype = mx::promote_types(gate.dtype(), up.dtype());
  auto out = mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(s), {as_f32(gate, s), as_f32(up, s)});
  return back_to(out, dtype, s);
}

void SwiGLU::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(inputs[0]);
  enc.set_input_array(inputs[1]);
  enc.set_output_array(out);
  enc.dispatch([g = inputs[0], u = inputs[1], o = out.data<float>()]() {
    Rows gr = rows_of(g), ur = rows_of(u);
    int64_t d = gr.d;
    parallel_for(gr.n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* gp = gr.row(r);
        const float* up = ur.row(r);
        float* op = o + r * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) op[j] = gp[j] / (1.0f + fast_exp(-gp[j])) * up[j];
      }
    });
  });
}

std::vector<mx::array> SwiGLU::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                   const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto& g = primals[0];
  auto grads = mx::array::make_arrays({g.shape(), g.shape()}, {mx::float32, mx::float32},
                                      std::make_shared<SwiGLUVJP>(stream()),
                                      {g, primals[1], as_f32(cotangents[0], stream())});
  std::vector<mx::array> vjps;
  for (int a : argnums) vjps.push_back(grads[a]);
  return vjps;
}

void SwiGLUVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& dg = outputs[0];
  auto& du = outputs[1];
  alloc(dg);
  alloc(du);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(dg);
  enc.set_output_array(du);
  enc.dispatch([g = inputs[0], u = inputs[1], dy = inputs[2], dgp = dg.data<float>(), dup = du.data<float>()]() {
    Rows gr = rows_of(g), ur = rows_of(u), yr = rows_of(dy);
    int64_t d = gr.d;
    parallel_for(gr.n, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const float* gp = gr.row(r);
        const float* up = ur.row(r);
        const float* yp = yr.row(r);
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          float sg = 1.0f / (1.0f + fast_exp(-gp[j]));
          dup[r * d + j] = yp[j] * gp[j] * sg;
          dgp[r * d + j] = yp[j] * up[j] * sg * (1.0f + gp[j] * (1.0f - sg));
        }
      }
    });
  });
}

// ================================================================ causal GQA attention
namespace {
void check_qkv(const mx::array& q, const mx::array& k, const mx::array& v, bool causal) {
  check_float(q, "q");
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw std::invalid_argument("efficientai engine attention: q, k, v must be (B, heads, length, head_dim)");
  int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3);
  int Hkv = k.shape(1), S = k.shape(2);
  if (k.shape(0) != B || v.shape(0) != B || v.shape(1) != Hkv || v.shape(2) != S || k.shape(3) != D ||
      v.shape(3) != D || Hkv == 0 || H % Hkv)
    throw std::invalid_argument("efficientai engine attention: k and v must be (B, kv_heads, S, D) with heads a "
                                "multiple of kv_heads, and v's head_dim equal to q's");
  if (causal && L > S) throw std::invalid_argument("efficientai engine attention: causal needs L <= S");
}
}  // namespace

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal) {
  check_qkv(q, k, v, causal);
  auto s = cpu_stream();
  auto out = mx::array(q.shape(), mx::float32, std::make_shared<Attention>(s, scale, causal),
                       {as_f32(q, s), as_f32(k, s), as_f32(v, s)});
  return back_to(out, q.dtype(), s);
}

mx::array attention_masked(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                           const mx::array& mask) {
  check_qkv(q, k, v, false);
  int L = q.shape(2), S = k.shape(2);
  bool leading_ones = true;
  for (int ax = 0; ax + 2 < int(mask.ndim()); ++ax) leading_ones = leading_ones && mask.shape(ax) == 1;
  if (mask.dtype() != mx::bool_ || mask.ndim() > 4 || !leading_ones)
    throw std::invalid_argument("efficientai engine attention: the mask must be boolean, broadcastable to (L, S) "
                                "and the same for every batch row and head");
  auto s = cpu_stream();
  auto m2 = mask.ndim() >= 2 ? mx::reshape(mask, {mask.shape(-2), mask.shape(-1)}, s)
                             : mx::reshape(mask, {1, mask.ndim() ? mask.shape(-1) : 1}, s);
  m2 = mx::contiguous(mx::broadcast_to(m2, {L, S}, s), false, s);   // (L, S) bytes, row-contiguous
  auto out = mx::array(q.shape(), mx::float32, std::make_shared<Attention>(s, scale, false),
                       {as_f32(q, s), as_f32(k, s), as_f32(v, s), m2});
  return back_to(out, q.dtype(), s);
}

namespace {
constexpr int64_t kTiledRows = 16;   // from this many query rows on, attention transposes the keys first

// A few query rows (a decode step): each row's scores are dot products with the keys where they lie.
void attention_rows(const Rows& qr, const Rows& kr, const Rows& vr, float* o, int64_t B, int64_t H, int64_t L,
                    int64_t D, int64_t Hkv, int64_t S, float scale, bool causal, const bool* mask) {
  int64_t rep = H / Hkv, qblock = 8, nblocks = (L + qblock - 1) / qblock;
  parallel_tasks(int(B * H * nblocks), [&](int t) {
    int64_t blk = t % nblocks, bh = t / nblocks, b = bh / H, h = bh % H;
    int64_t kv_row0 = (b * Hkv + h / rep) * S;
    std::vector<float> p(S), acc(D);
    for (int64_t l = blk * qblock; l < std::min(L, (blk + 1) * qblock); ++l) {
      const float* qp = qr.row(bh * L + l);
      int64_t keys = causal ? std::min<int64_t>(S, l + (S - L) + 1) : S;   // bottom-right aligned, as MLX's
      float mx_score = -std::numeric_limits<float>::infinity();
      const bool* keep = mask ? mask + l * S : nullptr;
      for (int64_t j = 0; j < keys; ++j) {
        if (keep && !keep[j]) continue;
        const float* kp = kr.row(kv_row0 + j);
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < D; ++c) dot += qp[c] * kp[c];
        p[j] = dot * scale;
        mx_score = std::max(mx_score, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = keep && !keep[j] ? 0.0f : fast_exp(p[j] - mx_score);
        sum += p[j];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < keys; ++j) {
        if (keep && !keep[j]) continue;
        const float* vp = vr.row(kv_row0 + j);
        float pj = p[j];
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) acc[c] += pj * vp[c];
      }
      float inv = 1.0f / sum;
      float* op = o + (bh * L + l) * D;
      for (int64_t c = 0; c < D; ++c) op[c] = acc[c] * inv;
    }
  });
}

// Many query rows (a prompt, a training batch): each KV head's keys are first transposed to (D, S) (S padded to 16),
// so that four query rows at a time get their scores sixteen keys at a time in vector accumulators, and products
// with the value (or key) rows run over sixteen output columns at a time, the same way.
constexpr int64_t W = 16, R = 4;

// (D, Sp) copy of rows [row0, row0 + S) of `r`, zero-padded to Sp columns
void transpose_rows(const Rows& r, int64_t row0, int64_t S, int64_t D, int64_t Sp, float* dst) {
  for (int64_t j = 0; j < S; ++j) {
    const float* p = r.row(row0 + j);
    for (int64_t c = 0; c < D; ++c) dst[c * Sp + j] = p[c];
  }
  for (int64_t c = 0; c < D; ++c) std::fill(dst + c * Sp + S, dst + (c + 1) * Sp, 0.0f);
}

// out[r * Sp + j] = mul * (a[r] . column j of t) for R rows and j < kmax (rounded up to W); t is (D, Sp)
void row_products(const float* const* a, const float* t, int64_t D, int64_t Sp, int64_t kmax, float mul, float* out) {
  for (int64_t j0 = 0; j0 < kmax; j0 += W) {
    float s[R][W] = {};
    for (int64_t c = 0; c < D; ++c) {
      const float* tc = t + c * Sp + j0;
      for (int64_t r = 0; r < R; ++r) {
        float ac = a[r][c];
#pragma omp simd
        for (int64_t jj = 0; jj < W; ++jj) s[r][jj] += ac * tc[jj];
      }
    }
    for (int64_t r = 0; r < R; ++r)
#pragma omp simd
      for (int64_t jj = 0; jj < W; ++jj) out[r * Sp + j0 + jj] = s[r][jj] * mul;
  }
}

// out rows r < nr (row stride ld) = mul[r] * sum over j < kmax of w[r * Sp + j] * (row j of m): R rows, 16 columns
// at a time
void weighted_rows(const float* w, int64_t Sp, const Rows& m, int64_t row0, int64_t kmax, int64_t D, const float* mul,
                   int64_t nr, float* out, int64_t ld) {
  for (int64_t c0 = 0; c0 < D; c0 += W) {
    int64_t cw = std::min(W, D - c0);
    float a[R][W] = {};
    if (cw == W) {
      for (int64_t j = 0; j < kmax; ++j) {
        const float* mp = m.row(row0 + j) + c0;
        for (int64_t r = 0; r < R; ++r) {
          float wj = w[r * Sp + j];
#pragma omp simd
          for (int64_t cc = 0; cc < W; ++cc) a[r][cc] += wj * mp[cc];
        }
      }
    } else {
      for (int64_t j = 0; j < kmax; ++j) {
        const float* mp = m.row(row0 + j) + c0;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t cc = 0; cc < cw; ++cc) a[r][cc] += w[r * Sp + j] * mp[cc];
      }
    }
    for (int64_t r = 0; r < nr; ++r)
      for (int64_t cc = 0; cc < cw; ++cc) out[r * ld + c0 + cc] = a[r][cc] * mul[r];
  }
}

// softmax over each row's first keys[r] scores in place (a boolean mask row's False keys weigh 0), zeros up to kmax;
// returns 1 / the row's sum in inv[r] (the row is left unnormalised)
void softmax_rows(float* p, int64_t Sp, const int64_t* keys, int64_t kmax, const bool* const* keep, float* inv) {
  for (int64_t r = 0; r < R; ++r) {
    float* pr = p + r * Sp;
    const bool* kp = keep[r];
    if (kp)
      for (int64_t j = 0; j < keys[r]; ++j) pr[j] = kp[j] ? pr[j] : -std::numeric_limits<float>::infinity();
    float mx_score = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx_score)
    for (int64_t j = 0; j < keys[r]; ++j) mx_score = std::max(mx_score, pr[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < keys[r]; ++j) {
      pr[j] = fast_exp(pr[j] - mx_score);
      sum += pr[j];
    }
    if (kp)
      for (int64_t j = 0; j < keys[r]; ++j) {
        if (!kp[j]) sum -= pr[j], pr[j] = 0.0f;   // fast_exp clamps: a masked key's exp is ~1e-38, not 0
      }
    std::fill(pr + keys[r], pr + kmax, 0.0f);      // keys past a row's causal end weigh nothing
    inv[r] = 1.0f / sum;
  }
}

// The R query rows starting at l0 (a short last group repeats its last row, which is not written out): their row
// pointers in `a`, key counts (bottom-right aligned causal, as MLX's) and mask rows.
struct RowGroup {
  int64_t nr, kmax, keys[R];
  const bool* keep[R];
  RowGroup(int64_t l0, int64_t L, int64_t S, bool causal, const bool* mask) {
    nr = std::min(R, L - l0);
    for (int64_t r = 0; r < R; ++r) {
      int64_t l = l0 + std::min(r, nr - 1);
      keys[r] = causal ? std::min<int64_t>(S, l + (S - L) + 1) : S;
      keep[r] = mask ? mask + l * S : nullptr;
    }
    kmax = keys[R - 1];
  }
  void rows(const Rows& x, int64_t row0, const float** out) const {
    for (int64_t r = 0; r < R; ++r) out[r] = x.row(row0 + std::min(r, nr - 1));
  }
};

void attention_tiled(const Rows& qr, const Rows& kr, const Rows& vr, float* o, int64_t B, int64_t H, int64_t L,
                     int64_t D, int64_t Hkv, int64_t S, float scale, bool causal, const bool* mask) {
  int64_t rep = H / Hkv, Sp = (S + W - 1) / W * W, qblock = 8, nblocks = (L + qblock - 1) / qblock;
  std::vector<float> kt(size_t(B * Hkv * D * Sp));
  parallel_tasks(int(B * Hkv), [&](int t) { transpose_rows(kr, int64_t(t) * S, S, D, Sp, kt.data() + t * D * Sp); });
  parallel_tasks(int(B * H * nblocks), [&](int t) {
    int64_t blk = t % nblocks, bh = t / nblocks, b = bh / H, h = bh % H;
    int64_t kv = b * Hkv + h / rep;
    std::vector<float> p(R * Sp);
    for (int64_t l0 = blk * qblock; l0 < std::min(L, (blk + 1) * qblock); l0 += R) {
      RowGroup g(l0, L, S, causal, mask);
      const float* qp[R];
      g.rows(qr, bh * L + l0, qp);
      row_products(qp, kt.data() + kv * D * Sp, D, Sp, g.kmax, scale, p.data());
      float inv[R];
      softmax_rows(p.data(), Sp, g.keys, g.kmax, g.keep, inv);
      weighted_rows(p.data(), Sp, vr, kv * S, g.kmax, D, inv, g.nr, o + (bh * L + l0) * D, D);
    }
  });
}

// Attention's gradients, per (batch row, KV head) so that the key and value gradients of a head are summed by one
// task: the probabilities are recomputed as the forward computes them, then dV = Pᵀ dO, dP = dO Vᵀ,
// dS = P (dP - rowsum(P dP)), dQ = scale dS K, dK = scale dSᵀ Q.
void attention_backward(const Rows& qr, const Rows& kr, const Rows& vr, const Rows& dr, float* dq, float* dk,
                        float* dv, int64_t B, int64_t H, int64_t L, int64_t D, int64_t Hkv, int64_t S, float scale,
                        bool causal, const bool* mask) {
  int64_t rep = H / Hkv, Sp = (S + W - 1) / W * W;
  parallel_tasks(int(B * Hkv), [&](int t) {
    int64_t b = t / Hkv, kv = t;
    std::vector<float> kt(D * Sp), vt(D * Sp), p(R * Sp), dp(R * Sp);
    transpose_rows(kr, kv * S, S, D, Sp, kt.data());
    transpose_rows(vr, kv * S, S, D, Sp, vt.data());
    float* dkp = dk + kv * S * D;
    float* dvp = dv + kv * S * D;
    std::fill(dkp, dkp + S * D, 0.0f);
    std::fill(dvp, dvp + S * D, 0.0f);
    for (int64_t h = (kv % Hkv) * rep; h < (kv % Hkv + 1) * rep; ++h) {
      int64_t bh = b * H + h;
      for (int64_t l0 = 0; l0 < L; l0 += R) {
        RowGroup g(l0, L, S, causal, mask);
        const float *qp[R], *gp[R];
        g.rows(qr, bh * L + l0, qp);
        g.rows(dr, bh * L + l0, gp);
        row_products(qp, kt.data(), D, Sp, g.kmax, scale, p.data());
        row_products(gp, vt.data(), D, Sp, g.kmax, 1.0f, dp.data());
        float inv[R], mul[R];
        softmax_rows(p.data(), Sp, g.keys, g.kmax, g.keep, inv);
        for (int64_t r = 0; r < R; ++r) {
          float* pr = p.data() + r * Sp;
          float* dpr = dp.data() + r * Sp;
          float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
          for (int64_t j = 0; j < g.kmax; ++j) {
            pr[j] *= inv[r];
            delta += pr[j] * dpr[j];
          }
#pragma omp simd
          for (int64_t j = 0; j < g.kmax; ++j) dpr[j] = pr[j] * (dpr[j] - delta);   // dS
          mul[r] = scale;
        }
        weighted_rows(dp.data(), Sp, kr, kv * S, g.kmax, D, mul, g.nr, dq + (bh * L + l0) * D, D);
        for (int64_t j = 0; j < g.kmax; ++j) {
          float* dvr = dvp + j * D;
          float* dkr = dkp + j * D;
          for (int64_t r = 0; r < g.nr; ++r) {
            float pj = p[r * Sp + j], sj = dp[r * Sp + j] * scale;
            const float* gr_ = gp[r];
            const float* qr_ = qp[r];
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) {
              dvr[c] += pj * gr_[c];
              dkr[c] += sj * qr_[c];
            }
          }
        }
      }
    }
  });
}
}  // namespace

void Attention::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  const bool* mask = inputs.size() > 3 ? inputs[3].data<bool>() : nullptr;   // (L, S), row-contiguous
  enc.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], o = out.data<float>(), scale = scale_,
                causal = causal_, mask]() {
    Rows qr = rows_of(q), kr = rows_of(k), vr = rows_of(v);
    int64_t B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3), Hkv = k.shape(1), S = k.shape(2);
    if (L >= kTiledRows) attention_tiled(qr, kr, vr, o, B, H, L, D, Hkv, S, scale, causal, mask);
    else attention_rows(qr, kr, vr, o, B, H, L, D, Hkv, S, scale, causal, mask);
  });
}

std::vector<mx::array> Attention::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums, const std::vector<mx::array>&) {
  auto s = stream();
  std::vector<mx::array> ins = {primals[0], primals[1], primals[2], as_f32(cotangents[0], s)};
  if (primals.size() > 3) ins.push_back(primals[3]);
  auto grads = mx::array::make_arrays({primals[0].shape(), primals[1].shape(), primals[2].shape()},
                                      {mx::float32, mx::float32, mx::float32},
                                      std::make_shared<AttentionVJP>(s, scale_, causal_), ins);
  std::vector<mx::array> vjps;
  for (int a : argnums) vjps.push_back(a < 3 ? grads[a] : mx::zeros_like(primals[a], s));   // the mask: zero
  return vjps;
}

void AttentionVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  for (auto& out : outputs) enc.set_output_array(out);
  const bool* mask = inputs.size() > 4 ? inputs[4].data<bool>() : nullptr;   // (L, S), row-contiguous
  enc.dispatch([q = inputs[0], k = inputs[1], v = inputs[2], g = inputs[3], dq = outputs[0].data<float>(),
                dk = outputs[1].data<float>(), dv = outputs[2].data<float>(), scale = scale_, causal = causal_,
                mask]() {
    Rows qr = rows_of(q), kr = rows_of(k), vr = rows_of(v), gr = rows_of(g);
    attention_backward(qr, kr, vr, gr, dq, dk, dv, q.shape(0), q.shape(1), q.shape(2), q.shape(3), k.shape(1),
                       k.shape(2), scale, causal, mask);
  });
}

bool Attention::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const Attention*>(&other);
  return o && o->scale_ == scale_ && o->causal_ == causal_;
}

// ================================================================ GEMV: x (M rows, M small) @ W.T
// MLX sends a one-row matmul to BLAS sgemm, which packs (copies) the whole weight on every call; a decode step is
// ~200 of them. Here each output row is a dot product of a weight row read where it lies, four weight rows at a time
// (four independent FMA chains, vectorised by the compiler: AVX-512/AVX2 where -march allows, NEON on ARM), the
// rows of the output split over the pool.
namespace {
#if defined(__AVX512F__)
// 16 weights from p as float32: float32 as is, bfloat16 widened (its bits are float32's top half), float16 converted
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const mx::bfloat16_t* p) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline __m512 load16(const mx::float16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

// out[r] = dot(x, w[r]) over K for r < R: R weight rows streamed at once (more rows in flight read memory faster:
// 4 rows 14.5 GB/s, 16 rows 19 GB/s on one core of the 2-core Xeon), one FMA chain a row; x is float32, w float32,
// bfloat16 or float16
template <int R, typename T>
inline void dot_rows(const float* x, const T* const* w, int64_t K, float* out) {
#if defined(__AVX512F__)
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(xv, load16(w[r] + k), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float tail = 0.0f;   // the last K % 16
    for (int64_t j = k; j < K; ++j) tail += x[j] * static_cast<float>(w[r][j]);
    out[r] = _mm512_reduce_add_ps(acc[r]) + tail;
  }
#else
  // elsewhere (AVX2, NEON, scalar): the compiler vectorises the reductions, four rows at a time
  for (int r0 = 0; r0 < R; r0 += 4) {
    const T *w0 = w[r0], *w1 = w[std::min(r0 + 1, R - 1)], *w2 = w[std::min(r0 + 2, R - 1)],
            *w3 = w[std::min(r0 + 3, R - 1)];
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t k = 0; k < K; ++k) {
      float xv = x[k];
      a0 += xv * static_cast<float>(w0[k]);
      a1 += xv * static_cast<float>(w1[k]);
      a2 += xv * static_cast<float>(w2[k]);
      a3 += xv * static_cast<float>(w3[k]);
    }
    float a[4] = {a0, a1, a2, a3};
    for (int i = 0; i < 4 && r0 + i < R; ++i) out[r0 + i] = a[i];
  }
#endif
}

// o (M, N) = x (M rows of K) @ w.T (+ bias), w's rows of type T, the output rows split over the pool
template <typename T>
void gemv(const Rows& xr, const mx::array& w, const float* bp, float* o) {
  int64_t M = xr.n, K = xr.d, N = w.shape(0);
  // the weight in place: row-contiguous, or rows of unit stride at any row stride; else a packed copy
  const T* wbase = w.data<T>();
  int64_t ldw = K;
  std::vector<T> wcopy;
  if (!w.flags().row_contiguous) {
    if (w.strides()[1] == 1 || K == 1) {
      ldw = w.strides()[0];
    } else {
      wcopy.resize(size_t(N * K));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) wcopy[n * K + k] = wbase[n * w.strides()[0] + k * w.strides()[1]];
      wbase = wcopy.data();
    }
  }
  // tasks of whole groups of 16 rows, about 256 KB of weights each, up to 4 a thread (balance on a busy machine)
  constexpr int G = 16;
  int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (G * std::max<int64_t>(K * int64_t(sizeof(T)), 1)));
  parallel_for((N + G - 1) / G, grain, [&](int64_t g0, int64_t g1) {
    int64_t n = g0 * G, n1 = std::min(N, g1 * G);
    const T* ws[G];
    float acc[G];
    auto rows = [&](auto R) {   // R rows from n, every x row
      constexpr int r_ = decltype(R)::value;
      for (int r = 0; r < r_; ++r) ws[r] = wbase + (n + r) * ldw;
      for (int64_t m = 0; m < M; ++m) {
        dot_rows<r_>(xr.row(m), ws, K, acc);
        float* op = o + m * N + n;
        for (int r = 0; r < r_; ++r) op[r] = acc[r] + (bp ? bp[n + r] : 0.0f);
      }
      n += r_;
    };
    while (n + G <= n1) rows(std::integral_constant<int, G>{});
    while (n + 4 <= n1) rows(std::integral_constant<int, 4>{});
    while (n < n1) rows(std::integral_constant<int, 1>{});
  }, 4);
}
}  // namespace

mx::array linear(const mx::array& x, const mx::array& weight, const std::optional<mx::array>& bias) {
  auto wt = weight.dtype();
  if (wt != mx::float32 && wt != mx::bfloat16 && wt != mx::float16)
    throw std::invalid_argument("efficientai engine linear: weight must be float32, bfloat16 or float16");
  check_float(x, "x");
  if (bias) check_float(*bias, "bias");
  if (x.ndim() == 0 || weight.ndim() != 2 || weight.shape(1) != x.shape(-1))
    throw std::invalid_argument("efficientai engine linear: weight must be (N, K) with K = x.shape[-1]");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != weight.shape(0)))
    throw std::invalid_argument("efficientai engine linear: bias must have shape (N,) with N = weight.shape[0]");
  auto shape = x.shape();
  shape.back() = weight.shape(0);
  // x and bias in float32 (few values); the weight as stored, converted as it is read
  auto s = cpu_stream();
  std::vector<mx::array> ins = {as_f32(x, s), weight};
  if (bias) ins.push_back(as_f32(*bias, s));
  auto out = mx::array(shape, mx::float32, std::make_shared<Gemv>(s), ins);
  auto dtype = mx::promote_types(x.dtype(), wt);
  return back_to(out, bias ? mx::promote_types(dtype, bias->dtype()) : dtype, s);
}

void Gemv::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  const float* bias = inputs.size() > 2 ? inputs[2].data<float>() : nullptr;
  enc.dispatch([x = inputs[0], w = inputs[1], b = inputs.size() > 2 ? inputs[2] : inputs[1], bias,
                o = out.data<float>()]() {
    Rows xr = rows_of(x);
    int64_t N = w.shape(0);
    std::vector<float> bcopy;
    const float* bp = bias;
    if (bp && b.strides()[0] != 1 && N > 1) {   // a strided bias (a view): packed copy of its N floats
      bcopy.resize(N);
      for (int64_t n = 0; n < N; ++n) bcopy[n] = bias[n * b.strides()[0]];
      bp = bcopy.data();
    }
    if (w.dtype() == mx::bfloat16) gemv<mx::bfloat16_t>(xr, w, bp, o);
    else if (w.dtype() == mx::float16) gemv<mx::float16_t>(xr, w, bp, o);
    else gemv<float>(xr, w, bp, o);
  });
}

std::vector<mx::array> Gemv::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                 const std::vector<int>& argnums, const std::vector<mx::array>&) {
  // MLX's own ops: dx = g @ W, dW = g.T @ x over all rows, dbias = the sum of g over rows
  auto s = stream();
  const auto &x = primals[0], &w = primals[1];
  int N = w.shape(0), K = w.shape(1);
  const auto g = as_f32(cotangents[0], s);
  std::vector<mx::array> vjps;
  for (int a : argnums) {   // x and bias are float32 here (the op casts them in); the weight may not be
    if (a == 0) {
      vjps.push_back(mx::matmul(g, as_f32(w, s), s));
    } else if (a == 1) {
      auto g2 = mx::reshape(g, {-1, N}, s);
      vjps.push_back(back_to(mx::matmul(mx::transpose(g2, s), mx::reshape(x, {-1, K}, s), s), w.dtype(), s));
    } else {
      vjps.push_back(mx::sum(mx::reshape(g, {-1, N}, s), 0, false, s));
    }
  }
  return vjps;
}

// ================================================================ quantized GEMV (the quantization chapter's kernels)
extern "C" void efficientai_parallel_items(int nitems, qk_task_fn fn, void* ctx) {
  if (nitems <= 0) return;
  if (nitems == 1) {
    fn(ctx, 0);
    return;
  }
  parallel_tasks(nitems, [&](int item) { fn(ctx, item); });
}

namespace {
constexpr int kMaxQuantizedParts = 16;   // QK_MAX_SEG in qkernels.c

int quantized_k(const mx::array& w, int bits) { return int(w.shape(-1)) * 32 / bits; }
}  // namespace

bool quantized_supported(int k, int bits, int group_size) { return qk_supported(k, bits, group_size) == 0; }

std::vector<mx::array> quantized_matmul(const mx::array& x, const std::vector<mx::array>& w,
                                        const std::vector<mx::array>& scales, const std::vector<mx::array>& biases,
                                        int group_size, int bits) {
  auto fail = [](const std::string& what) {
    throw std::invalid_argument("efficientai engine quantized_matmul: " + what);
  };
  size_t n = w.size();
  if (n < 1 || n > size_t(kMaxQuantizedParts)) fail("takes 1 to 16 matrices");
  if (scales.size() != n || biases.size() != n) fail("needs one scales and one biases array per matrix");
  if (bits != 2 && bits != 4 && bits != 8) fail("bits must be 2, 4 or 8");
  check_float(x, "x");
  if (x.ndim() == 0) fail("x must have at least one axis");
  int K = int(x.shape(-1));
  if (!quantized_supported(K, bits, group_size))
    fail("this layout is not supported (K=" + std::to_string(K) + ", " + std::to_string(bits) + "-bit, group " +
         std::to_string(group_size) + ")");
  auto s = cpu_stream();
  std::vector<mx::array> ins = {mx::contiguous(as_f32(x, s), false, s)};
  std::vector<mx::Shape> shapes;
  auto dtype = x.dtype();
  for (size_t i = 0; i < n; ++i) {
    if (w[i].dtype() != mx::uint32 || w[i].ndim() != 2 || quantized_k(w[i], bits) != K)
      fail("w[" + std::to_string(i) + "] must be uint32 (N, K*bits/32) with K = x.shape[-1]");
    mx::Shape groups = {w[i].shape(0), K / group_size};
    for (const auto* a : {&scales[i], &biases[i]}) {
      check_float(*a, "scales/biases");
      if (a->shape() != groups) fail("scales and biases must have shape (N, K / group_size)");
    }
    dtype = mx::promote_types(dtype, scales[i].dtype());
    auto shape = x.shape();
    shape.back() = w[i].shape(0);
    shapes.push_back(shape);
  }
  for (size_t i = 0; i < n; ++i) ins.push_back(mx::contiguous(w[i], false, s));
  for (size_t i = 0; i < n; ++i) ins.push_back(mx::contiguous(as_f32(scales[i], s), false, s));
  for (size_t i = 0; i < n; ++i) ins.push_back(mx::contiguous(as_f32(biases[i], s), false, s));
  auto outs = mx::array::make_arrays(shapes, std::vector<mx::Dtype>(n, mx::float32),
                                     std::make_shared<QuantizedGemv>(s, group_size, bits), ins);
  for (auto& o : outs) o = back_to(o, dtype, s);
  return outs;
}

void QuantizedGemv::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) alloc(o);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  for (auto& o : outputs) enc.set_output_array(o);
  std::vector<float*> ys;
  for (auto& o : outputs) ys.push_back(o.data<float>());
  enc.dispatch([inputs, ys, gs = group_size_, bits = bits_]() {
    const auto& x = inputs[0];
    int n = int(ys.size()), K = int(x.shape(-1)), M = K ? int(x.size() / K) : 0;
    std::vector<const void*> w(n);
    std::vector<const float*> sc(n), bi(n);
    std::vector<int> rows(n);
    for (int i = 0; i < n; ++i) {
      w[i] = inputs[1 + i].data<uint32_t>();
      sc[i] = inputs[1 + n + i].data<float>();
      bi[i] = inputs[1 + 2 * n + i].data<float>();
      rows[i] = int(inputs[1 + i].shape(0));
    }
    if (M == 0) return;
    // every row count takes the fused GEMV here (8 rows of x at a time): the op is meant for decoding's few rows
    int rc = qk_matmul(x.data<float>(), M, K, n, w.data(), sc.data(), bi.data(), rows.data(), bits, gs, ys.data(),
                       nullptr, 0, M);
    if (rc != 0) {   // only out of memory is left once the op checked the layout: NaN, not a crash on MLX's thread
      for (int i = 0; i < n; ++i) std::fill(ys[i], ys[i] + size_t(M) * rows[i], std::numeric_limits<float>::quiet_NaN());
    }
  });
}

std::vector<mx::array> QuantizedGemv::vjp(const std::vector<mx::array>& primals,
                                          const std::vector<mx::array>& cotangents, const std::vector<int>& argnums,
                                          const std::vector<mx::array>&) {
  // dx = sum_i g_i @ dequantize(W_i), MLX's own ops; the codes, scales and biases are constants (as in QLoRA)
  auto s = stream();
  size_t n = cotangents.size();
  std::vector<mx::array> vjps;
  for (int a : argnums) {
    if (a != 0)
      throw std::invalid_argument("efficientai engine quantized_matmul: only x is differentiable, not the quantized "
                                  "weights, scales or biases");
    std::optional<mx::array> dx;
    for (size_t i = 0; i < n; ++i) {
      auto wf = mx::dequantize(primals[1 + i], primals[1 + n + i], primals[1 + 2 * n + i], group_size_, bits_,
                               "affine", std::nullopt, mx::float32, s);
      auto term = mx::matmul(as_f32(cotangents[i], s), wf, s);
      dx = dx ? mx::add(*dx, term, s) : term;
    }
    vjps.push_back(*dx);
  }
  return vjps;
}

bool QuantizedGemv::is_equivalent(const mx::Primitive& other) const {
  if (typeid(other) != typeid(*this)) return false;
  const auto& o = static_cast<const QuantizedGemv&>(other);
  return o.group_size_ == group_size_ && o.bits_ == bits_;
}

// ================================================================ LoRA update
namespace {
constexpr int64_t kMaxLoraRank = 256;
constexpr int64_t kLoraChunk = 256;   // columns per pass: the accumulators and b's rows for them stay in L1

// a (K, r) as its transpose packed (r rows of K), whatever a's strides
std::vector<float> transposed(const mx::array& a) {
  int64_t K = a.shape(0), r = a.shape(1);
  std::vector<float> t(r * K);
  const float* p = a.data<float>();
  int64_t s0 = a.strides()[0], s1 = a.strides()[1];
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < r; ++j) t[j * K + k] = p[k * s0 + j * s1];
  return t;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float alpha, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void check_f32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32)
    throw std::invalid_argument(std::string("efficientai engine lora_add: ") + what + " must be float32");
}
}  // namespace

mx::array lora_add(const mx::array& x, const mx::array& y, const mx::array& a, const mx::array& b, float scale) {
  check_f32(x, "x");
  check_f32(y, "y");
  check_f32(a, "a");
  check_f32(b, "b");
  if (x.ndim() == 0 || y.ndim() != x.ndim() || a.ndim() != 2 || b.ndim() != 2)
    throw std::invalid_argument("efficientai engine lora_add: x (..., K), y (..., M), a (K, r) and b (r, M) expected");
  for (int i = 0; i + 1 < int(x.ndim()); ++i)
    if (x.shape(i) != y.shape(i))
      throw std::invalid_argument("efficientai engine lora_add: x and y must have the same leading shape");
  if (a.shape(0) != x.shape(-1) || b.shape(0) != a.shape(1) || b.shape(1) != y.shape(-1))
    throw std::invalid_argument("efficientai engine lora_add: a must be (K, r) and b (r, M) for x (..., K), y (..., M)");
  if (a.shape(1) > kMaxLoraRank)
    throw std::invalid_argument("efficientai engine lora_add: rank above " + std::to_string(kMaxLoraRank));
  return mx::array(y.shape(), mx::float32, std::make_shared<LoraAdd>(cpu_stream(), scale), {x, y, a, b});
}

// NB rows at a time: each chunk of b's rows is read once for the block, each output written once
template <int NB>
void lora_rows_forward(const Rows& xr, const Rows& yr, int64_t n, const float* at, const Rows& br, int64_t r,
                       float s, float* o) {
  int64_t K = xr.d, M = yr.d;
  float z[NB][kMaxLoraRank];
  const float* xs[NB];
  const float* ys[NB];
  float* os[NB];
  for (int i = 0; i < NB; ++i) {
    xs[i] = xr.row(n + i);
    ys[i] = yr.row(n + i);
    os[i] = o + (n + i) * M;
  }
  for (int64_t j = 0; j < r; ++j)
    for (int i = 0; i < NB; ++i) z[i][j] = s * dot(xs[i], at + j * K, K);
  for (int64_t m0 = 0; m0 < M; m0 += kLoraChunk) {   // out = y + z @ b, a chunk of columns at a time
    int64_t c = std::min(kLoraChunk, M - m0);
    for (int i = 0; i < NB; ++i) {
      float acc[kLoraChunk];
      std::memcpy(acc, ys[i] + m0, c * sizeof(float));
      for (int64_t j = 0; j < r; ++j) axpy(acc, z[i][j], br.row(j) + m0, c);
      std::memcpy(os[i] + m0, acc, c * sizeof(float));
    }
  }
}

void LoraAdd::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  const auto& y = inputs[1];
  if (y.is_donatable() && y.flags().row_contiguous) out.copy_shared_buffer(y);   // update y in place
  else alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  enc.set_output_array(out);
  enc.dispatch([x = inputs[0], y = inputs[1], a = inputs[2], b = inputs[3], o = out.data<float>(), s = scale_]() {
    Rows xr = rows_of(x), yr = rows_of(y);
    std::vector<float> at = transposed(a);
    Rows br = rows_of(b);   // b's r rows (a packed copy if b is a view with a strided last axis)
    int64_t r = a.shape(1);
    parallel_for(xr.n, 16, [&](int64_t n0, int64_t n1) {
      int64_t n = n0;
      for (; n + 8 <= n1; n += 8) lora_rows_forward<8>(xr, yr, n, at.data(), br, r, s, o);
      for (; n < n1; ++n) lora_rows_forward<1>(xr, yr, n, at.data(), br, r, s, o);
    });
  });
}

std::vector<mx::array> LoraAdd::vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums, const std::vector<mx::array>&) {
  const auto &x = primals[0], &a = primals[2], &b = primals[3];
  const auto g = as_f32(cotangents[0], stream());
  std::vector<mx::array> grads;
  for (int n : argnums)
    if (n != 1 && grads.empty())
      grads = mx::array::make_arrays({x.shape(), a.shape(), b.shape()}, {mx::float32, mx::float32, mx::float32},
                                     std::make_shared<LoraAddVJP>(stream(), scale_), {x, a, b, g});
  std::vector<mx::array> vjps;
  for (int n : argnums) vjps.push_back(n == 0 ? grads[0] : n == 1 ? g : n == 2 ? grads[1] : grads[2]);
  return vjps;
}

bool LoraAdd::is_equivalent(const mx::Primitive& other) const {
  return typeid(other) == typeid(*this) && static_cast<const LoraAdd&>(other).scale_ == scale_;
}

// NB rows of the backward: dx for the rows, their shares of da.T (dat, r x K) and db (dbt, r x M) added in place
template <int NB>
void lora_rows_backward(const Rows& xr, const Rows& gr, int64_t n, const float* at, const Rows& br, int64_t r,
                        float s, float* dx, float* dat, float* dbt) {
  int64_t K = xr.d, M = gr.d;
  float xa[NB][kMaxLoraRank], g[NB][kMaxLoraRank];
  const float* xs[NB];
  const float* gs[NB];
  float* dxs[NB];
  for (int i = 0; i < NB; ++i) {
    xs[i] = xr.row(n + i);
    gs[i] = gr.row(n + i);
    dxs[i] = dx + (n + i) * K;
  }
  for (int64_t j = 0; j < r; ++j)
    for (int i = 0; i < NB; ++i) {
      xa[i][j] = s * dot(xs[i], at + j * K, K);   // scale * (x @ a)
      g[i][j] = s * dot(gs[i], br.row(j), M);    // d(x @ a) = scale * dout @ b.T
    }
  for (int64_t k0 = 0; k0 < K; k0 += kLoraChunk) {
    int64_t c = std::min(kLoraChunk, K - k0);
    for (int i = 0; i < NB; ++i) {                  // dx = d(x @ a) @ a.T
      float acc[kLoraChunk] = {};
      for (int64_t j = 0; j < r; ++j) axpy(acc, g[i][j], at + j * K + k0, c);
      std::memcpy(dxs[i] + k0, acc, c * sizeof(float));
    }
    for (int64_t j = 0; j < r; ++j)                // da.T += d(x @ a).T @ x
      for (int i = 0; i < NB; ++i) axpy(dat + j * K + k0, g[i][j], xs[i] + k0, c);
  }
  for (int64_t m0 = 0; m0 < M; m0 += kLoraChunk) { // db += (scale * x @ a).T @ dout
    int64_t c = std::min(kLoraChunk, M - m0);
    for (int64_t j = 0; j < r; ++j)
      for (int i = 0; i < NB; ++i) axpy(dbt + j * M + m0, xa[i][j], gs[i] + m0, c);
  }
}

void LoraAddVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) alloc(o);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  for (auto& o : outputs) enc.set_output_array(o);
  enc.dispatch([x = inputs[0], a = inputs[1], b = inputs[2], dout = inputs[3], dx = outputs[0].data<float>(),
                da = outputs[1].data<float>(), db = outputs[2].data<float>(), s = scale_]() {
    Rows xr = rows_of(x), gr = rows_of(dout);
    std::vector<float> at = transposed(a);
    Rows br = rows_of(b);   // b's r rows (a packed copy if b is a view with a strided last axis)
    int64_t N = xr.n, K = xr.d, M = gr.d, r = a.shape(1);
    // each task sums its rows' shares of da.T (r x K) and db (r x M) in its own buffer; the buffers are added after
    int tasks = int(std::max<int64_t>(1, std::min<int64_t>(pool().threads(), N / 16)));
    int64_t per = (N + tasks - 1) / tasks, width = r * (K + M);
    std::vector<float> part(size_t(tasks) * width, 0.0f);
    std::function<void(int)> f = [&](int t) {
      float* dat = part.data() + t * width;
      int64_t n = t * per, n1 = std::min(N, (t + 1) * per);
      for (; n + 8 <= n1; n += 8) lora_rows_backward<8>(xr, gr, n, at.data(), br, r, s, dx, dat, dat + r * K);
      for (; n < n1; ++n) lora_rows_backward<1>(xr, gr, n, at.data(), br, r, s, dx, dat, dat + r * K);
    };
    pool().run(tasks, f);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < r; ++j) {
        float v = 0.0f;
        for (int t = 0; t < tasks; ++t) v += part[t * width + j * K + k];
        da[k * r + j] = v;
      }
    for (int64_t i = 0; i < r * M; ++i) {
      float v = 0.0f;
      for (int t = 0; t < tasks; ++t) v += part[t * width + r * K + i];
      db[i] = v;
    }
  });
}

bool LoraAddVJP::is_equivalent(const mx::Primitive& other) const {
  return typeid(other) == typeid(*this) && static_cast<const LoraAddVJP&>(other).scale_ == scale_;
}

// ================================================================ cross-entropy over rows
namespace {
void check_ce(const mx::array& logits, const mx::array& targets) {
  if (logits.dtype() != mx::float32 || logits.ndim() != 2)
    throw std::invalid_argument("efficientai engine cross_entropy: logits must be float32 of shape (N, V)");
  if (!mx::issubdtype(targets.dtype(), mx::integer) || targets.ndim() != 1 || targets.shape(0) != logits.shape(0))
    throw std::invalid_argument("efficientai engine cross_entropy: targets must be integers of shape (N,)");
}

// element i of an evaluated 1-D array, through its stride
template <typename T>
T at1(const mx::array& a, int64_t i) { return a.data<T>()[i * a.strides()[0]]; }
}  // namespace

mx::array cross_entropy(const mx::array& logits, const mx::array& targets) {
  check_ce(logits, targets);
  auto s = cpu_stream();
  return mx::array({logits.shape(0)}, mx::float32, std::make_shared<CrossEntropy>(s),
                   {logits, mx::astype(targets, mx::int32, s)});
}

mx::array cross_entropy_grad(const mx::array& logits, const mx::array& targets, const mx::array& ce,
                             const mx::array& c) {
  check_ce(logits, targets);
  auto n = logits.shape(0);
  if (ce.ndim() != 1 || ce.shape(0) != n || c.ndim() != 1 || c.shape(0) != n)
    throw std::invalid_argument("efficientai engine cross_entropy_grad: ce and c must have shape (N,)");
  auto s = cpu_stream();
  return mx::array(logits.shape(), mx::float32, std::make_shared<CrossEntropyGrad>(s),
                   {logits, mx::astype(targets, mx::int32, s), as_f32(ce, s), as_f32(c, s)});
}

void CrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  enc.set_output_array(out);
  enc.dispatch([l = inputs[0], t = inputs[1], o = out.data<float>()]() {
    Rows lr = rows_of(l);
    int64_t V = lr.d;
    parallel_for(lr.n, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const float* p = lr.row(n);
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t v = 0; v < V; ++v) m = std::max(m, p[v]);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t v = 0; v < V; ++v) sum += fast_exp(p[v] - m);
        int64_t k = at1<int32_t>(t, n);
        o[n] = (k >= 0 && k < V) ? m + std::log(sum) - p[k] : std::numeric_limits<float>::quiet_NaN();
      }
    });
  });
}

void CrossEntropyGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  alloc(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) enc.set_input_array(in);
  enc.set_output_array(out);
  enc.dispatch([l = inputs[0], t = inputs[1], ce = inputs[2], c = inputs[3], g = out.data<float>()]() {
    Rows lr = rows_of(l);
    int64_t V = lr.d;
    parallel_for(lr.n, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const float* p = lr.row(n);
        float* gp = g + n * V;
        int64_t k = at1<int32_t>(t, n);
        float cn = at1<float>(c, n);
        if (k < 0 || k >= V) {
          std::fill(gp, gp + V, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        float lse = at1<float>(ce, n) + p[k];
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) gp[v] = cn * fast_exp(p[v] - lse);
        gp[k] -= cn;
      }
    });
  });
}

}  // namespace efficientai
