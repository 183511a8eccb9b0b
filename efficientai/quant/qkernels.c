/* Fast CPU kernels for MLX affine-quantized linear layers (efficientai.quant.kernels).
 *
 * Weights stay in MLX's own layout: W is N x K, each row packed little-endian into uint32 words (value j of
 * a word is (w >> (bits*j)) & mask, so the row's bytes hold its codes in order), with one float32 scale and
 * bias per group of `gs` consecutive values of a row: w = scale * q + bias.
 *
 *   y[M,N] = x[M,K] @ W^T
 *
 * Small M (decoding): a fused dequantize-dot GEMV over the output rows, split across threads.
 *   sum_k x_k (s q_k + b) = s * sum_k x_k q_k + b * sum_k x_k, so each group costs one dot of the codes
 *   with x, and the bias term uses the per-group sums of x, computed once per call.
 *   A "chunk" is VL bytes of a row (VL = 16 lanes with AVX-512, 8 otherwise). Widening its bytes to VL int32
 *   lanes and shifting/masking gives P = 8/bits vectors of codes: vector j holds codes i*P + j, i < VL.
 *   Instead of interleaving the codes back into order, x is permuted once per call into the same order.
 * Large M (prompt processing), int8: x rounded to int8 per row and group, integer dot products with the codes
 *   (AVX-512 VNNI, AVX-VNNI or AVX2; see the int8 section below).
 * Large M, float: dequantize a block of rows to float32 (threaded), then one sgemm from the BLAS the caller hands
 *   us (cblas_sgemm), block after block, so the float32 copy stays in cache.
 *
 * Vectors are GCC/Clang vector extensions: with -march=native they compile to AVX-512 or AVX2 (or NEON on
 * arm64), no intrinsics needed; the file builds with GCC and with Clang (Apple's included).
 * Build: cc -O3 -march=native -shared -fPIC -pthread.
 *
 * Threads: a small pool of our own rather than OpenMP. Work is split into small items that threads claim
 * with an atomic counter, and the calling thread works too, so a worker that the OS has descheduled (busy
 * cores) delays nothing: the caller takes its share. Idle workers spin briefly, then sleep. The pool is one per
 * process (per loaded library) and runs one job at a time: every public entry point holds a mutex for its whole
 * call, so callers on several threads (or several Python `Kernels` objects on one library) take turns.
 * The engine's MLX extension compiles this file too (-DQK_EXTERNAL_POOL): there the GEMV is a node of MLX's graph
 * (efficientai/csrc/engine.cpp, QuantizedGemv) and its items run on the engine's pool.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK_VERSION 5

#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint8_t vb __attribute__((vector_size(VL)));

/* cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
static _Atomic(sgemm_fn) qk_sgemm; /* null until set by the caller (qk_set_sgemm), read by any thread */
enum { RowMajor = 101, NoTrans = 111, Trans = 112 };

int qk_version(void) { return QK_VERSION; }
int qk_lanes(void) { return VL; }
void qk_set_sgemm(void *fn) { atomic_store(&qk_sgemm, (sgemm_fn)fn); }
int qk_has_sgemm(void) { return atomic_load(&qk_sgemm) != 0; }

/* ---------------------------------------------------------------- thread pool */
#define QK_MAX_THREADS 64
typedef void (*task_fn)(void *ctx, int item);

static struct {
    pthread_mutex_t mu; /* with cv: where idle workers sleep */
    pthread_cond_t cv;
    pthread_mutex_t call; /* held by each public entry point for its whole call: one job on the pool at a time */
    _Atomic int nthreads, started; /* nthreads includes the caller */
    pthread_t th[QK_MAX_THREADS];
    /* One word says everything a claim needs: generation (16 bits) | number of items (24) | next item (24).
     * fn and ctx are written before the word is published and read only after a successful claim, when the
     * job cannot finish (and be replaced) before the claimed item is done. */
    _Atomic(uint64_t) ticket;
    _Atomic(task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int done, nsleeping;
    _Atomic long spin;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .call = PTHREAD_MUTEX_INITIALIZER,
          .nthreads = 1};

#define T_GEN(t) ((uint32_t)((t) >> 48))
#define T_N(t) ((int)(((t) >> 24) & 0xFFFFFF))
#define T_I(t) ((int)((t) & 0xFFFFFF))

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Claim and run items of the current job until none are left. */
static void run_items(void) {
    uint64_t t = atomic_load(&pool.ticket);
    while (T_I(t) < T_N(t)) {
        if (atomic_compare_exchange_weak(&pool.ticket, &t, t + 1)) {
            atomic_load(&pool.fn)(atomic_load(&pool.ctx), T_I(t));
            atomic_fetch_add(&pool.done, 1);
            t = atomic_load(&pool.ticket);
        }
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint32_t seen = T_GEN(atomic_load(&pool.ticket));
    for (;;) {
        uint32_t gen = T_GEN(atomic_load(&pool.ticket));
        for (long i = 0, n = atomic_load(&pool.spin); gen == seen && i < n; i++) {
            cpu_relax();
            gen = T_GEN(atomic_load(&pool.ticket));
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.mu);
            atomic_fetch_add(&pool.nsleeping, 1);
            while ((gen = T_GEN(atomic_load(&pool.ticket))) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            atomic_fetch_sub(&pool.nsleeping, 1);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = gen;
        run_items();
    }
    return 0;
}

/* fork() while a kernel runs: the forking thread waits for the call to end (it takes the call mutex before the fork
 * and releases it after, in both processes), and the child, which has none of the workers, computes on its own
 * thread (a later qk_init starts a new pool, with fresh sleep locks: a worker may have held them at the fork). */
static void before_fork(void) { pthread_mutex_lock(&pool.call); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.call); }
static void after_fork_child(void) {
    pthread_mutex_unlock(&pool.call);
    pthread_mutex_init(&pool.mu, 0);
    pthread_cond_init(&pool.cv, 0);
    atomic_store(&pool.nsleeping, 0);
    atomic_store(&pool.nthreads, 1);
    atomic_store(&pool.started, 0);
}

/* Use n threads in all (the caller plus n-1 workers); spin: pause-loop iterations before an idle worker
 * sleeps. The first call starts the pool (later ones only change spin); returns the number of threads. Safe to
 * call from several threads at once: one starts the pool, the others wait for it. */
int qk_init(int n, long spin) {
    atomic_store(&pool.spin, spin);
    if (atomic_load(&pool.started)) return atomic_load(&pool.nthreads);
    pthread_mutex_lock(&pool.call);
    if (!atomic_load(&pool.started)) {
        static _Atomic int atfork_registered = 0;
        if (!atomic_exchange(&atfork_registered, 1)) pthread_atfork(before_fork, after_fork_parent, after_fork_child);
        if (n < 1) n = 1;
        if (n > QK_MAX_THREADS) n = QK_MAX_THREADS;
        int started = 1;
        for (int i = 1; i < n; i++) {
            if (pthread_create(&pool.th[i], 0, worker, 0) != 0) break;
            pthread_detach(pool.th[i]);
            started++;
        }
        atomic_store(&pool.nthreads, started);
        atomic_store(&pool.started, 1);
    }
    pthread_mutex_unlock(&pool.call);
    return atomic_load(&pool.nthreads);
}

int qk_threads(void) { return atomic_load(&pool.nthreads); }

#ifdef QK_EXTERNAL_POOL
/* Built into the engine's MLX extension (efficientai/csrc): the engine's pool runs the items, so a process decoding
 * with both has one pool of spinning threads, not two contending for the cores. Our own pool is never started. */
void efficientai_parallel_items(int nitems, task_fn fn, void *ctx);
static void parallel_for(int nitems, task_fn fn, void *ctx) { efficientai_parallel_items(nitems, fn, ctx); }
#else
/* Run fn(ctx, i) for i in [0, nitems) on the pool; returns when all are done. Not reentrant: only called with
 * pool.call held (the public entry points take it). */
static void parallel_for(int nitems, task_fn fn, void *ctx) {
    if (atomic_load(&pool.nthreads) <= 1 || nitems <= 1 || nitems > 0xFFFFFF) {
        for (int i = 0; i < nitems; i++) fn(ctx, i);
        return;
    }
    atomic_store(&pool.fn, fn);
    atomic_store(&pool.ctx, ctx);
    atomic_store(&pool.done, 0);
    uint64_t gen = (T_GEN(atomic_load(&pool.ticket)) + 1) & 0xFFFF;
    atomic_store(&pool.ticket, (gen << 48) | ((uint64_t)nitems << 24));
    if (atomic_load(&pool.nsleeping) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    run_items();
    while (atomic_load(&pool.done) < nitems) cpu_relax(); /* items a worker is still finishing */
}
#endif

/* ---------------------------------------------------------------- kernels */
static inline vf loadf(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void storef(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* VL bytes widened to VL int32 lanes (GCC lowers the generic conversion byte by byte: use the instruction). */
static inline vi load_chunk(const uint8_t *p) {
#if VL == 16
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vb b;
    memcpy(&b, p, VL);
    return __builtin_convertvector(b, vi);
#endif
}
static inline vf splat(float x) { return (vf){0} + x; }

/* Codes i*P + j (i < VL) of a chunk whose bytes were widened to w. */
static inline __attribute__((always_inline)) vf codes(vi w, int j, const int BITS) {
    if (BITS == 8) return __builtin_convertvector(w, vf);
    return __builtin_convertvector((w >> (j * BITS)) & ((1 << BITS) - 1), vf);
}

/* Scale of each lane of chunk c: one group per chunk, or two (2-bit codes with AVX-512: a chunk of 64 codes
 * spans two groups of 32; lanes i < VL/2 hold codes of the first). qk_supported rules out anything else. */
static inline __attribute__((always_inline)) vf chunk_scale(const float *sr, int c, int gs, int gshift, const int BITS) {
    const int CV = VL * (8 / BITS);
    if (CV <= gs) return splat(sr[gshift >= 0 ? c >> gshift : c * CV / gs]); /* a shift, not a division, per chunk */
    vi lane;
    for (int i = 0; i < VL; i++) lane[i] = i;
    vi first = lane < VL / 2;
    return (vf)(((vi)splat(sr[2 * c]) & first) | ((vi)splat(sr[2 * c + 1]) & ~first));
}

/* log2(gs / CV) when that is a power of two (chunks per group), else -1. */
static inline int group_shift(int gs, int CV) {
    const int r = gs / CV;
    return gs >= CV && (r & (r - 1)) == 0 ? __builtin_ctz(r) : -1;
}

static inline float hsum(vf v) {
#if VL == 16
    return _mm512_reduce_add_ps((__m512)v);
#endif
    float a[VL];
    memcpy(a, &v, sizeof v);
    for (int w = VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) a[i] += a[i + w];
    return a[0];
}

/* One call's arguments, shared by the work items. The weight may be several matrices with the same K and
 * layout ("segments", e.g. the q, k and v projections that all read the same x), each with its own output
 * (M x n[i], row-major): one pass over x, one wake-up of the pool, contiguous results. */
#define QK_MAX_SEG 16
typedef struct {
    const float *x, *xp, *xs;
    const uint8_t *w[QK_MAX_SEG];
    const float *s[QK_MAX_SEG], *b[QK_MAX_SEG];
    int n[QK_MAX_SEG], off[QK_MAX_SEG + 1]; /* rows of each segment; off: first stacked row of each */
    float *y[QK_MAX_SEG];
    int nseg, M, K, ntot, bits, gs, rows, seg, r0;
    float *out;
} job_t;

/* GEMV: rows [n0, n1) of one segment for MM inputs (xp: permuted x, MM x K; xs: group sums, MM x G),
 * written to y (row stride ldy). */
static inline __attribute__((always_inline)) void gemv_rows(const job_t *j, const uint8_t *w, const float *s,
                                                            const float *b, float *y, int ldy, int n0, int n1,
                                                            const int BITS, const int MM) {
    const int P = 8 / BITS, CV = VL * P, K = j->K, gs = j->gs, G = K / gs, nch = K / CV, gshift = group_shift(gs, CV);
    const size_t rowbytes = (size_t)K * BITS / 8;
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * rowbytes;
        const float *sr = s + (size_t)n * G, *br = b + (size_t)n * G;
        vf acc0[8], acc1[8];
        float r[8];
        for (int m = 0; m < MM; m++) { /* bias term: four partial sums, so the adds don't wait on each other */
            acc0[m] = acc1[m] = (vf){0};
            float r4[4] = {0.f, 0.f, 0.f, 0.f};
            for (int g = 0; g < G; g++) r4[g & 3] += br[g] * j->xs[m * G + g];
            r[m] = (r4[0] + r4[1]) + (r4[2] + r4[3]);
        }
#define CHUNK(c, ACC)                                                                  \
    {                                                                                  \
        vi wv = load_chunk(wr + (size_t)(c) * VL);                                     \
        vf sv = chunk_scale(sr, c, gs, gshift, BITS);                                  \
        vf q[4];                                                                       \
        for (int jj = 0; jj < P; jj++) q[jj] = codes(wv, jj, BITS);                    \
        for (int m = 0; m < MM; m++) {                                                 \
            const float *xc = j->xp + (size_t)m * K + (size_t)(c) * CV;                \
            vf t = q[0] * loadf(xc);                                                   \
            for (int jj = 1; jj < P; jj++) t += q[jj] * loadf(xc + jj * VL);           \
            ACC[m] += t * sv;                                                          \
        }                                                                              \
    }
        int c = 0;
        if (MM <= 2) { /* two accumulators: the FMA latency chain would otherwise be the bottleneck */
            for (; c + 1 < nch; c += 2) { CHUNK(c, acc0) CHUNK(c + 1, acc1) }
        }
        for (; c < nch; c++) CHUNK(c, acc0)
#undef CHUNK
        for (int m = 0; m < MM; m++) y[(size_t)m * ldy + n] = hsum(acc0[m] + acc1[m]) + r[m];
    }
}

#define GEMV_M(BITS)                                                                                   \
    switch (j->M) {                                                                                    \
    case 1: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 1); break;                                          \
    case 2: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 2); break;                                          \
    case 3: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 3); break;                                          \
    case 4: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 4); break;                                          \
    case 5: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 5); break;                                          \
    case 6: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 6); break;                                          \
    case 7: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 7); break;                                          \
    default: gemv_rows(j, w, s, b, y, ldy, n0, n1, BITS, 8); break;                                         \
    }

/* Work item: `rows` rows of one segment (items are numbered segment after segment). */
static void gemv_item(void *ctx, int item) {
    const job_t *j = (const job_t *)ctx;
    int seg = 0, per;
    while (item >= (per = (j->n[seg] + j->rows - 1) / j->rows)) { item -= per; seg++; }
    int n0 = item * j->rows, n1 = n0 + j->rows < j->n[seg] ? n0 + j->rows : j->n[seg];
    const uint8_t *w = j->w[seg];
    const float *s = j->s[seg], *b = j->b[seg];
    float *y = j->y[seg];
    const int ldy = j->n[seg];
    if (j->bits == 4) { GEMV_M(4) } else if (j->bits == 8) { GEMV_M(8) } else { GEMV_M(2) }
}

/* Interleave: lanes 0..VL/2 (ZIP_LO) or VL/2..VL (ZIP_HI) of a and b, alternating. Clang and GCC >= 12 have
 * __builtin_shufflevector (constant indices); older GCC only __builtin_shuffle (a mask vector). */
#if VL == 16
#define ILO_IDX 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define IHI_IDX 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#else
#define ILO_IDX 0, 8, 1, 9, 2, 10, 3, 11
#define IHI_IDX 4, 12, 5, 13, 6, 14, 7, 15
#endif
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ZIP_LO(a, b) __builtin_shufflevector(a, b, ILO_IDX)
#define ZIP_HI(a, b) __builtin_shufflevector(a, b, IHI_IDX)
#else
#define ZIP_LO(a, b) __builtin_shuffle(a, b, (vi){ILO_IDX})
#define ZIP_HI(a, b) __builtin_shuffle(a, b, (vi){IHI_IDX})
#endif

/* Dequantize rows [n0, n1) of one matrix into out ((n1-n0) x K, natural order). */
static inline __attribute__((always_inline)) void dequant_rows(const uint8_t *w, const float *s, const float *b,
                                                               int K, int gs, float *out, int n0, int n1,
                                                               const int BITS) {
    const int P = 8 / BITS, CV = VL * P, G = K / gs, nch = K / CV, gshift = group_shift(gs, CV);
    const size_t rowbytes = (size_t)K * BITS / 8;
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * rowbytes;
        const float *sr = s + (size_t)n * G, *br = b + (size_t)n * G;
        float *o = out + (size_t)(n - n0) * K;
        for (int c = 0; c < nch; c++) {
            vi wv = load_chunk(wr + (size_t)c * VL);
            vf sv = chunk_scale(sr, c, gs, gshift, BITS), bv = chunk_scale(br, c, gs, gshift, BITS);
            vf q[4];
            for (int jj = 0; jj < P; jj++) q[jj] = codes(wv, jj, BITS) * sv + bv;
            float *oc = o + (size_t)c * CV;
            if (P == 1) storef(oc, q[0]);
            else if (P == 2) {
                storef(oc, ZIP_LO(q[0], q[1]));
                storef(oc + VL, ZIP_HI(q[0], q[1]));
            } else {
                vf e0 = ZIP_LO(q[0], q[2]), e1 = ZIP_HI(q[0], q[2]);
                vf f0 = ZIP_LO(q[1], q[3]), f1 = ZIP_HI(q[1], q[3]);
                storef(oc, ZIP_LO(e0, f0));
                storef(oc + VL, ZIP_HI(e0, f0));
                storef(oc + 2 * VL, ZIP_LO(e1, f1));
                storef(oc + 3 * VL, ZIP_HI(e1, f1));
            }
        }
    }
}

/* Work item: rows r0 + [item*rows, (item+1)*rows) of segment seg, clipped to the block (M holds its row
 * count), into out. */
static void dequant_item(void *ctx, int item) {
    const job_t *j = (const job_t *)ctx;
    int a = j->r0 + item * j->rows, e = a + j->rows < j->r0 + j->M ? a + j->rows : j->r0 + j->M;
    float *o = j->out + (size_t)(a - j->r0) * j->K;
    const int sg = j->seg;
    if (j->bits == 4) dequant_rows(j->w[sg], j->s[sg], j->b[sg], j->K, j->gs, o, a, e, 4);
    else if (j->bits == 8) dequant_rows(j->w[sg], j->s[sg], j->b[sg], j->K, j->gs, o, a, e, 8);
    else dequant_rows(j->w[sg], j->s[sg], j->b[sg], j->K, j->gs, o, a, e, 2);
}

/* Rows per work item: about `bytes` of packed weights each, at least 4 rows. */
static int rows_per_item(int K, int bits, int bytes) {
    int r = bytes / (K * bits / 8 + 1);
    return r < 4 ? 4 : r;
}

/* Rows [r0, r0 + nrows) of segment seg, dequantized into out (nrows x K), on the pool. */
static void dequant_block(const job_t *j, int seg, float *out, int r0, int nrows) {
    job_t d = *j;
    d.out = out, d.seg = seg, d.r0 = r0, d.M = nrows;
    d.rows = rows_per_item(j->K, j->bits, 16384);
    parallel_for((nrows + d.rows - 1) / d.rows, dequant_item, &d);
}

/* 0 if the kernels handle this layout: bits 2, 4 or 8; groups that divide K and line up with the chunks.
 * Else -1 (bits) or -2 (group size or K). */
int qk_supported(int K, int bits, int gs) {
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    const int CV = VL * (8 / bits);
    if (gs <= 0 || K % gs != 0 || K % CV != 0 || (CV > gs ? CV != 2 * gs : gs % CV != 0)) return -2;
    return 0;
}

static int make_job(job_t *j, int K, int nseg, const void *const *w, const float *const *s,
                    const float *const *b, const int *n, int bits, int gs) {
    int e = qk_supported(K, bits, gs);
    if (e) return e;
    if (nseg < 1 || nseg > QK_MAX_SEG) return -5;
    if (!w || !s || !b || !n) return -7;
    memset(j, 0, sizeof *j);
    j->K = K, j->nseg = nseg, j->bits = bits, j->gs = gs;
    for (int i = 0; i < nseg; i++) {
        if (n[i] < 0 || !w[i] || !s[i] || !b[i]) return -7;
        j->w[i] = (const uint8_t *)w[i], j->s[i] = s[i], j->b[i] = b[i], j->n[i] = n[i];
        j->off[i + 1] = j->off[i] + n[i];
    }
    j->ntot = j->off[nseg];
    return 0;
}

/* The stacked matrices (nseg of them, n[i] rows each, K columns) dequantized into out (sum(n) x K).
 * Returns 0, or < 0 for an unsupported layout or bad arguments. */
static int dequantize_impl(int K, int nseg, const void *const *w, const float *const *s, const float *const *b,
                           const int *n, int bits, int gs, float *out) {
    job_t j;
    int e = make_job(&j, K, nseg, w, s, b, n, bits, gs);
    if (e) return e;
    for (int i = 0; i < nseg; i++) dequant_block(&j, i, out + (size_t)j.off[i] * K, 0, n[i]);
    return 0;
}

/* y[i] (M x n[i]) = x (M x K) @ W_i^T for each segment i. For M <= small_m the fused GEMV (8 rows of x at a
 * time); else dequantize blocks of up to `block` rows into scratch (block x K floats) and multiply each with
 * sgemm. Returns 0, or < 0: -1/-2 unsupported layout, -3 large M but no sgemm set, -4 out of memory,
 * -5 too many segments, -7 a negative size or a null pointer. */
static int matmul_impl(const float *x, int M, int K, int nseg, const void *const *w, const float *const *s,
                       const float *const *b, const int *n, int bits, int gs, float *const *y, float *scratch,
                       int block, int small_m) {
    job_t j;
    int e = make_job(&j, K, nseg, w, s, b, n, bits, gs);
    if (e) return e;
    if (M < 0 || !x || (M > small_m && (block < 1 || !scratch))) return -7;
    j.x = x, j.M = M;
    for (int i = 0; i < nseg; i++) j.y[i] = y[i];
    if (M <= small_m) { /* fused GEMV, 8 rows of x at a time */
        if (M > 8) {
            float *yc[QK_MAX_SEG];
            for (int m0 = 0; m0 < M; m0 += 8) {
                int mb = M - m0 < 8 ? M - m0 : 8;
                for (int i = 0; i < nseg; i++) yc[i] = y[i] + (size_t)m0 * n[i];
                e = matmul_impl(x + (size_t)m0 * K, mb, K, nseg, w, s, b, n, bits, gs, yc, scratch, block, small_m);
                if (e) return e;
            }
            return 0;
        }
        const int G = K / gs, P = 8 / bits, CV = VL * P;
        float *xp = (float *)malloc(sizeof(float) * ((size_t)M * K + (size_t)M * G));
        if (!xp) return -4;
        float *xs = xp + (size_t)M * K;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * K;
            for (int c = 0; c < K; c += CV)
                for (int jj = 0; jj < P; jj++)
                    for (int i = 0; i < VL; i++) xp[(size_t)m * K + c + jj * VL + i] = xm[c + i * P + jj];
            for (int g = 0; g < G; g++) {
                float t = 0.f;
                for (int k = 0; k < gs; k++) t += xm[g * gs + k];
                xs[m * G + g] = t;
            }
        }
        j.xp = xp, j.xs = xs;
        j.rows = rows_per_item(K, bits, 8192);
        int items = 0;
        for (int i = 0; i < nseg; i++) items += (n[i] + j.rows - 1) / j.rows;
        parallel_for(items, gemv_item, &j);
        free(xp);
        return 0;
    }
    if (!qk_sgemm) return -3;
    for (int i = 0; i < nseg; i++)
        for (int r0 = 0; r0 < n[i]; r0 += block) {
            int nb = r0 + block < n[i] ? block : n[i] - r0;
            dequant_block(&j, i, scratch, r0, nb);
            qk_sgemm(RowMajor, NoTrans, Trans, M, nb, K, 1.0f, x, K, scratch, K, 0.0f, y[i] + r0, n[i]);
        }
    return 0;
}

/* y (M x ntot, row-major) = x (M x K) @ [W_0; W_1; ...]^T for prompt-sized M: the segments' rows are stacked
 * (q/k/v, gate/up), dequantized into scratch `block` stacked rows at a time (across segment boundaries) and each
 * block is one sgemm, so a fused stack is a single large sgemm when it fits the scratch. Segment i's output is
 * columns [off_i, off_i + n_i) of y. Returns 0 or < 0 as qk_matmul. */
static int stacked_impl(const float *x, int M, int K, int nseg, const void *const *w, const float *const *s,
                        const float *const *b, const int *n, int bits, int gs, float *y, float *scratch, int block) {
    job_t j;
    int e = make_job(&j, K, nseg, w, s, b, n, bits, gs);
    if (e) return e;
    if (M < 0 || !x || !y || block < 1 || !scratch) return -7;
    if (!qk_sgemm) return -3;
    const int ntot = j.ntot;
    for (int r0 = 0; r0 < ntot; r0 += block) {
        const int r1 = r0 + block < ntot ? r0 + block : ntot;
        for (int i = 0; i < nseg; i++) {
            const int a = j.off[i] > r0 ? j.off[i] : r0, z = j.off[i + 1] < r1 ? j.off[i + 1] : r1;
            if (a < z) dequant_block(&j, i, scratch + (size_t)(a - r0) * K, a - j.off[i], z - a);
        }
        qk_sgemm(RowMajor, NoTrans, Trans, M, r1 - r0, K, 1.0f, x, K, scratch, K, 0.0f, y + r0, ntot);
    }
    return 0;
}

/* ---------------------------------------------------------------- int8 prompt path (AVX-512 VNNI, AVX-VNNI, AVX2)
 * Prompt-sized M without dequantizing: x is quantized per row and group to int8 (scale dx = max|x| / 127), and
 * each group's dot of codes with x is an integer dot product:
 *   sum_k x_k (s q_k + b) ~= dx sum_k xq_k (s q_k + b) = s dx sum_k q_k xq_k + b dx sum_k xq_k.
 * The bias term uses the sum of the quantized x, not the exact one: then the result is exactly the dot of the
 * rounded x with the weights, whose error scales with |w|, not with the codes' offset s*q (~8s at 4 bits).
 * VPDPBUSD multiplies 4 unsigned bytes (codes) by 4 signed bytes (x) and adds them into an int32 lane, 64
 * products per instruction, 4x an fp32 FMA. A tile is 16 output rows, one per int32 lane: word q of each of the
 * 16 rows is gathered into one vector (MLX's packing kept: plane p of a word, (w >> bits*p) & mask per byte,
 * holds codes i*P + p, i < 4), and 4 bytes of x in the same order are broadcast to every lane. Tiles are
 * repacked per call from MLX's arrays, so nothing but MLX's weights is kept in memory. 256-bit builds (AVX-VNNI, or
 * AVX2's VPMADDUBSW + VPMADDWD, whose int16 pair sums overflow on 8-bit codes) use tiles of 8 rows. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define QK_INT8 512 /* the vector width: 512 (AVX-512 VNNI) or 256 (AVX-VNNI, or AVX2's maddubs/madd) */
#define TR 16 /* output rows per tile (int32 lanes) */
#define MT 8  /* rows of x per register block */
typedef __m512i VI;
typedef __m512 VF;
#define I8_DOT(acc, w, x) _mm512_dpbusd_epi32(acc, w, x)
#define I8_ZEROI _mm512_setzero_si512()
#define I8_ZEROF _mm512_setzero_ps()
#define I8_LOADI(p) _mm512_loadu_si512((const void *)(p))
#define I8_SET1I _mm512_set1_epi32
#define I8_SET1B _mm512_set1_epi8
#define I8_SRLI _mm512_srli_epi32
#define I8_AND _mm512_and_si512
#define I8_LOADF _mm512_loadu_ps
#define I8_SET1F _mm512_set1_ps
#define I8_FMA _mm512_fmadd_ps
#define I8_MUL _mm512_mul_ps
#define I8_CVT _mm512_cvtepi32_ps
#define I8_STORE(y, v, nr) _mm512_mask_storeu_ps(y, (__mmask16)((1u << (nr)) - 1), v)
#define I8_BITS8 1 /* 8-bit codes: u8 x s8 never overflows the int32 lanes */
#elif defined(__AVX2__) && defined(__FMA__)
#define QK_INT8 256
#define TR 8
#define MT 4 /* 16 vector registers: 4 int + 4 float accumulators, the codes and x */
typedef __m256i VI;
typedef __m256 VF;
#if defined(__AVXVNNI__)
#define I8_DOT(acc, w, x) _mm256_dpbusd_avx_epi32(acc, w, x)
#define I8_BITS8 1
#else /* no VNNI: pairs of u8 x s8 summed to int16 (saturating: fine for codes < 16, not for 8-bit), then to int32 */
#define I8_DOT(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)))
#define I8_BITS8 0
#endif
#define I8_ZEROI _mm256_setzero_si256()
#define I8_ZEROF _mm256_setzero_ps()
#define I8_LOADI(p) _mm256_loadu_si256((const __m256i *)(p))
#define I8_SET1I _mm256_set1_epi32
#define I8_SET1B _mm256_set1_epi8
#define I8_SRLI _mm256_srli_epi32
#define I8_AND _mm256_and_si256
#define I8_LOADF _mm256_loadu_ps
#define I8_SET1F _mm256_set1_ps
#define I8_FMA _mm256_fmadd_ps
#define I8_MUL _mm256_mul_ps
#define I8_CVT _mm256_cvtepi32_ps
static inline void I8_STORE(float *y, __m256 v, int nr) {
    if (nr == 8) { _mm256_storeu_ps(y, v); return; }
    float t[8];
    _mm256_storeu_ps(t, v);
    memcpy(y, t, sizeof(float) * nr);
}
#endif

#ifdef QK_INT8

typedef struct {
    const job_t *j;
    const int8_t *xq; /* Mp x K, permuted to the codes' plane order */
    const float *dx, *xs; /* Mp x G */
    int M, Mp;
    float *y;       /* M x ntot */
    const float *x; /* M x K */
    _Atomic int failed; /* a work item could not allocate its tile */
} i8job_t;

/* Rows of x to int8, QROWS rows per work item. Per group: scale max|x| / 127, codes rounded to nearest (even),
 * and their sum; 16 values at a time, each 16-byte chunk shuffled into the planes' order (codes i*P + p of a
 * word at byte 4p + i; a word holds 4P codes, 4P <= 16, so chunks never straddle words). */
#define QROWS 4
#if QK_INT8 == 512
/* One group of x (gs values, a multiple of 16) to int8 codes in q, chunk by chunk shuffled by shuf; its scale is
 * returned and the sum of its codes stored in *isum. */
static inline float quant_group(const float *xg, int gs, int8_t *q, const int8_t perm[16], int *isum) {
    const __m128i shuf = _mm_loadu_si128((const __m128i *)perm);
    __m512 amax = _mm512_setzero_ps();
    for (int k = 0; k < gs; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(xg + k)));
    const float am = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(am > 0 ? 127.f / am : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < gs; k += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + k), inv));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128((__m128i *)(q + k), _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(v), shuf));
    }
    *isum = _mm512_reduce_add_epi32(sum);
    return am / 127.f;
}
#else
static inline float quant_group(const float *xg, int gs, int8_t *q, const int8_t perm[16], int *isum) {
    float am = 0.f;
    for (int k = 0; k < gs; k++) am = fabsf(xg[k]) > am ? fabsf(xg[k]) : am;
    const __m256 iv = _mm256_set1_ps(am > 0 ? 127.f / am : 0.f);
    int sum = 0;
    for (int k = 0; k < gs; k += 16) {
        int32_t v[16]; /* x * inv rounded to nearest even, as the AVX-512 version (no fused multiply-add) */
        _mm256_storeu_si256((__m256i *)v, _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k), iv)));
        _mm256_storeu_si256((__m256i *)(v + 8), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k + 8), iv)));
        for (int t = 0; t < 16; t++) {
            sum += v[t];
            q[k + t] = (int8_t)v[(int)perm[t]];
        }
    }
    *isum = sum;
    return am / 127.f;
}
#endif

static void quant_item(void *ctx, int item) {
    i8job_t *c = (i8job_t *)ctx;
    const job_t *j = c->j;
    const int K = j->K, gs = j->gs, G = K / gs, P = 8 / j->bits;
    int8_t perm[16];
    for (int t = 0; t < 16; t++) { /* destination byte t of a chunk takes source code perm[t] */
        const int w = t / (4 * P) * (4 * P), bt = t - w, p = bt / 4, i = bt % 4;
        perm[t] = (int8_t)(w + i * P + p);
    }
    int8_t *xq = (int8_t *)c->xq;
    float *dx = (float *)c->dx, *xs = (float *)c->xs;
    for (int m = item * QROWS; m < (item + 1) * QROWS && m < c->M; m++)
        for (int g = 0; g < G; g++) {
            int isum;
            const float d = quant_group(c->x + (size_t)m * K + (size_t)g * gs, gs, xq + (size_t)m * K + (size_t)g * gs,
                                        perm, &isum);
            dx[(size_t)m * G + g] = d, xs[(size_t)m * G + g] = d * (float)isum;
        }
}

static inline __attribute__((always_inline)) void i8_tile(const i8job_t *c, int seg, int n0, uint32_t *tw, float *ts,
                                                          float *tb, const int BITS) {
    const job_t *j = c->j;
    const int K = j->K, gs = j->gs, G = K / gs, WPR = K * BITS / 32, WPG = gs * BITS / 32, CPW = 32 / BITS,
              P = 8 / BITS, ntot = j->ntot;
    const int nr = j->n[seg] - n0 < TR ? j->n[seg] - n0 : TR;
    const uint32_t *w = (const uint32_t *)j->w[seg] + (size_t)n0 * WPR;
    const float *s = j->s[seg] + (size_t)n0 * G, *b = j->b[seg] + (size_t)n0 * G;
    for (int r = 0; r < TR; r++)
        for (int q = 0; q < WPR; q++) tw[(size_t)q * TR + r] = r < nr ? w[(size_t)r * WPR + q] : 0;
    for (int r = 0; r < TR; r++)
        for (int g = 0; g < G; g++) {
            ts[g * TR + r] = r < nr ? s[(size_t)r * G + g] : 0.f;
            tb[g * TR + r] = r < nr ? b[(size_t)r * G + g] : 0.f;
        }
    const VI mask = I8_SET1B((char)((1 << BITS) - 1));
    float *y = c->y + j->off[seg] + n0;
    for (int m0 = 0; m0 < c->Mp; m0 += MT) {
        VF acc[MT];
        for (int m = 0; m < MT; m++) acc[m] = I8_ZEROF;
        const int8_t *xr = c->xq + (size_t)m0 * K;
        for (int g = 0; g < G; g++) {
            VI ai[MT];
            for (int m = 0; m < MT; m++) ai[m] = I8_ZEROI;
            for (int q = g * WPG; q < (g + 1) * WPG; q++) {
                const VI wv = I8_LOADI(tw + (size_t)q * TR);
                for (int p = 0; p < P; p++) {
                    const VI pl = BITS == 8 ? wv : I8_AND(I8_SRLI(wv, BITS * p), mask);
#pragma GCC unroll 8
                    for (int m = 0; m < MT; m++) {
                        int32_t xv;
                        memcpy(&xv, xr + (size_t)m * K + (size_t)q * CPW + 4 * p, 4);
                        ai[m] = I8_DOT(ai[m], pl, I8_SET1I(xv));
                    }
                }
            }
            const VF sv = I8_LOADF(ts + g * TR), bv = I8_LOADF(tb + g * TR);
#pragma GCC unroll 8
            for (int m = 0; m < MT; m++) {
                const float d = c->dx[(size_t)(m0 + m) * G + g], sx = c->xs[(size_t)(m0 + m) * G + g];
                acc[m] = I8_FMA(I8_CVT(ai[m]), I8_MUL(sv, I8_SET1F(d)), acc[m]);
                acc[m] = I8_FMA(bv, I8_SET1F(sx), acc[m]);
            }
        }
        for (int m = 0; m < MT && m0 + m < c->M; m++) I8_STORE(y + (size_t)(m0 + m) * ntot, acc[m], nr);
    }
}

static void i8_item(void *ctx, int item) {
    i8job_t *c = (i8job_t *)ctx;
    const job_t *j = c->j;
    int seg = 0, per;
    while (item >= (per = (j->n[seg] + TR - 1) / TR)) { item -= per; seg++; }
    const int K = j->K, G = K / j->gs;
    uint32_t *tw = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)TR * (K * j->bits / 32) + sizeof(float) * 2 * TR * G);
    if (!tw) { atomic_store(&c->failed, 1); return; }
    float *ts = (float *)(tw + (size_t)TR * (K * j->bits / 32)), *tb = ts + TR * G;
    if (j->bits == 4) i8_tile(c, seg, item * TR, tw, ts, tb, 4);
    else if (j->bits == 8) i8_tile(c, seg, item * TR, tw, ts, tb, 8);
    else i8_tile(c, seg, item * TR, tw, ts, tb, 2);
    free(tw);
}

#endif

/* The int8 path's vector width in bits (512: AVX-512 VNNI; 256: AVX-VNNI or AVX2), or 0 if this build has none. */
int qk_has_int8(void) {
#ifdef QK_INT8
    return QK_INT8;
#else
    return 0;
#endif
}

/* 1 if the int8 path runs this layout (groups of a multiple of 16; 8-bit codes need VNNI), else 0. */
int qk_int8_supported(int bits, int gs) {
#ifdef QK_INT8
    return gs % 16 == 0 && (bits != 8 || I8_BITS8) && (bits == 2 || bits == 4 || bits == 8);
#else
    (void)bits, (void)gs;
    return 0;
#endif
}

/* y (M x ntot, row-major) = x (M x K) @ [W_0; W_1; ...]^T like qk_matmul_stacked, on the int8 path: x is quantized
 * to int8 per row and group. Returns 0, or < 0 as qk_matmul, -6 if this build has
 * no int8 path (needs AVX2). */
static int int8_impl(const float *x, int M, int K, int nseg, const void *const *w, const float *const *s,
                     const float *const *b, const int *n, int bits, int gs, float *y) {
#ifndef QK_INT8
    (void)x, (void)M, (void)K, (void)nseg, (void)w, (void)s, (void)b, (void)n, (void)bits, (void)gs, (void)y;
    return -6;
#else
    job_t j;
    int e = make_job(&j, K, nseg, w, s, b, n, bits, gs);
    if (e) return e;
    if (M < 0 || !x || !y) return -7;
    if (!qk_int8_supported(bits, gs)) return -2;
    const int G = K / gs, Mp = (M + MT - 1) / MT * MT;
    int8_t *xq = (int8_t *)malloc((size_t)Mp * K + sizeof(float) * 2 * (size_t)Mp * G + 64);
    if (!xq) return -4;
    float *dx = (float *)(((uintptr_t)(xq + (size_t)Mp * K) + 63) & ~(uintptr_t)63), *xs = dx + (size_t)Mp * G;
    memset(xq + (size_t)M * K, 0, (size_t)(Mp - M) * K); /* padding rows (quant_item writes the others) */
    memset(dx + (size_t)M * G, 0, sizeof(float) * (size_t)(Mp - M) * G);
    memset(xs + (size_t)M * G, 0, sizeof(float) * (size_t)(Mp - M) * G);
    i8job_t c = {.j = &j, .xq = xq, .dx = dx, .xs = xs, .M = M, .Mp = Mp, .y = y, .x = x};
    parallel_for((M + QROWS - 1) / QROWS, quant_item, &c);
    int items = 0;
    for (int i = 0; i < nseg; i++) items += (n[i] + TR - 1) / TR;
    parallel_for(items, i8_item, &c);
    free(xq);
    return atomic_load(&c.failed) ? -4 : 0;
#endif
}

/* ---------------------------------------------------------------- entry points
 * Each holds pool.call for its whole call: the pool runs one job at a time, and qk_sgemm stays as it was.
 * Return codes: 0, or -1/-2 unsupported layout, -3 large M but no sgemm set, -4 out of memory, -5 too many
 * segments, -6 no int8 path in this build, -7 a negative size or a null pointer. */
#define LOCKED(expr)                      \
    do {                                  \
        pthread_mutex_lock(&pool.call);   \
        int rc_ = (expr);                 \
        pthread_mutex_unlock(&pool.call); \
        return rc_;                       \
    } while (0)

/* The stacked matrices (nseg of them, n[i] rows each, K columns) dequantized into out (sum(n) x K). */
int qk_dequantize(int K, int nseg, const void *const *w, const float *const *s, const float *const *b,
                  const int *n, int bits, int gs, float *out) {
    LOCKED(dequantize_impl(K, nseg, w, s, b, n, bits, gs, out));
}

/* y[i] (M x n[i]) = x (M x K) @ W_i^T for each segment i (see matmul_impl). */
int qk_matmul(const float *x, int M, int K, int nseg, const void *const *w, const float *const *s,
              const float *const *b, const int *n, int bits, int gs, float *const *y, float *scratch, int block,
              int small_m) {
    LOCKED(matmul_impl(x, M, K, nseg, w, s, b, n, bits, gs, y, scratch, block, small_m));
}

/* y (M x ntot) = x (M x K) @ [W_0; W_1; ...]^T through sgemm (see stacked_impl). */
int qk_matmul_stacked(const float *x, int M, int K, int nseg, const void *const *w, const float *const *s,
                      const float *const *b, const int *n, int bits, int gs, float *y, float *scratch, int block) {
    LOCKED(stacked_impl(x, M, K, nseg, w, s, b, n, bits, gs, y, scratch, block));
}

/* The same on the int8 path (see int8_impl). */
int qk_matmul_int8(const float *x, int M, int K, int nseg, const void *const *w, const float *const *s,
                   const float *const *b, const int *n, int bits, int gs, float *y) {
    LOCKED(int8_impl(x, M, K, nseg, w, s, b, n, bits, gs, y));
}
