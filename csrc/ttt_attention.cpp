// TTT attention (DESIGN.md §4): the draft's attention at step i of the training-time-test unroll.
//
// Packed layout: T tokens of all rows, documents given by cu_seqlens (int32, [n_docs + 1]).
//   q       [T, Hq, D]      queries of step i
//   k0, v0  [T, Hkv, D]     keys/values of step 0
//   kd, vd  [i, T, Hkv, D]  keys/values of steps 1..i (index j-1 holds step j)
// A query at position t sees k0/v0 at positions s <= t of its own document, and kd[j, t], vd[j, t].
// q head h reads kv head h / (Hq / Hkv).
// Outputs: out [T, Hq, D] (dtype of q) and lse [Hq, T] fp32, the log-sum-exp of the scaled scores.
//
// This file holds the op schemas, the CPU kernels and, when built with SPECFORGE_WITH_CUDA, the CUDA
// bindings of the launchers in ttt_attention_cuda.cu. The autograd formula and the fake kernels are
// registered from Python (specforge_mcore/ops/ttt_attention.py).
//
// CPU algorithm: flash-style. Each (query tile, head) walks the key tiles of its document with an
// online softmax (running max m and sum l per row) and folds the diagonal keys into the same m and l,
// so memory beyond the inputs and outputs is a few tiles per thread. Backward recomputes the
// probabilities from lse in two passes that need no atomics: one over query tiles (dq, and dkd/dvd,
// which belong to a single position) and one over key tiles (dk0/dv0).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef SPECFORGE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ttt_attention_cuda.h"
#endif

// The hot loops are written so the compiler vectorises them; on x86-64 they are also compiled for
// AVX2/FMA and picked at load time, so one wheel runs everywhere and fast where it can.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPECFORGE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPECFORGE_CLONES
#endif

namespace specforge_mcore {
namespace {

constexpr int64_t kMaxHeadDim = 256;
constexpr int kTileQ = 64;  // query rows per work item
constexpr int kTileK = 64;  // keys per inner tile; a compile-time width keeps the score loops vectorised
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Dims {
  int64_t T, Hq, Hkv, D, n_diag, group;
};

Dims check_inputs(const at::Tensor& q, const at::Tensor& k0, const at::Tensor& v0, const at::Tensor& kd,
                  const at::Tensor& vd, const at::Tensor& cu_seqlens) {
  TORCH_CHECK(q.dim() == 3, "ttt_attention: q must be [T, Hq, D], got ", q.sizes());
  TORCH_CHECK(k0.dim() == 3, "ttt_attention: k0 must be [T, Hkv, D], got ", k0.sizes());
  TORCH_CHECK(kd.dim() == 4, "ttt_attention: kd must be [steps, T, Hkv, D], got ", kd.sizes());
  TORCH_CHECK(v0.sizes() == k0.sizes(), "ttt_attention: v0 ", v0.sizes(), " must match k0 ", k0.sizes());
  TORCH_CHECK(vd.sizes() == kd.sizes(), "ttt_attention: vd ", vd.sizes(), " must match kd ", kd.sizes());
  Dims d{q.size(0), q.size(1), k0.size(1), q.size(2), kd.size(0), 0};
  TORCH_CHECK(k0.size(0) == d.T && k0.size(2) == d.D, "ttt_attention: k0 ", k0.sizes(),
              " does not fit q ", q.sizes());
  TORCH_CHECK(kd.size(1) == d.T && kd.size(2) == d.Hkv && kd.size(3) == d.D, "ttt_attention: kd ",
              kd.sizes(), " does not fit k0 ", k0.sizes());
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, "ttt_attention: kv heads (", d.Hkv,
              ") must divide query heads (", d.Hq, ")");
  TORCH_CHECK(d.D > 0 && d.D <= kMaxHeadDim, "ttt_attention: head dim ", d.D, " is not in 1..", kMaxHeadDim);
  d.group = d.Hq / d.Hkv;
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "ttt_attention: dtype ", dtype, " is not float32, bfloat16 or float16");
  for (const at::Tensor* t : {&k0, &v0, &kd, &vd}) {
    TORCH_CHECK(t->scalar_type() == dtype, "ttt_attention: all of q, k0, v0, kd, vd must be ", dtype,
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), "ttt_attention: all inputs must be on ", q.device());
  }
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2 && cu_seqlens.scalar_type() == at::kInt,
              "ttt_attention: cu_seqlens must be int32 [n_docs + 1], got ", cu_seqlens.scalar_type(), " ",
              cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.device() == q.device(), "ttt_attention: cu_seqlens must be on ", q.device());
  TORCH_CHECK(d.T < (int64_t{1} << 31), "ttt_attention: T = ", d.T, " does not fit int32 cu_seqlens");
  return d;
}

// ----------------------------------------------------------------------------------------------
// Tiles
// ----------------------------------------------------------------------------------------------

// Rows [begin, end) of the document [doc_begin, doc_end); tiles never cross a document boundary.
struct Tile {
  int64_t begin, end, doc_begin, doc_end;
};

std::vector<Tile> document_tiles(const at::Tensor& cu_seqlens, int64_t T, int64_t tile_rows) {
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n_docs = cu.size(0) - 1;
  TORCH_CHECK(c[0] == 0 && c[n_docs] == T, "ttt_attention: cu_seqlens must start at 0 and end at T = ", T,
              ", got ", c[0], " .. ", c[n_docs]);
  std::vector<Tile> tiles;
  for (int64_t doc = 0; doc < n_docs; ++doc) {
    TORCH_CHECK(c[doc] <= c[doc + 1], "ttt_attention: cu_seqlens must be non-decreasing, got ", c[doc],
                " then ", c[doc + 1]);
    for (int64_t b = c[doc]; b < c[doc + 1]; b += tile_rows) {
      tiles.push_back({b, std::min<int64_t>(b + tile_rows, c[doc + 1]), c[doc], c[doc + 1]});
    }
  }
  return tiles;
}

// ----------------------------------------------------------------------------------------------
// fp32 tile kernels, written so the compiler vectorises them
// ----------------------------------------------------------------------------------------------

constexpr int kGemmRows = 4;   // register block of the tile GEMM: 4 rows x 16 columns
constexpr int kGemmCols = 16;

// Eight fp32 lanes (GCC/Clang vector extension): one AVX register in the x86-64-v3 clone, two SSE
// registers in the default one, plain code elsewhere.
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// C[M, N] (+)= A[M, K] @ B[K, N], all row-major with leading dims; M is a multiple of kGemmRows (callers
// pad with zero rows). A 4 x 16 block of C stays in eight vector registers across the K loop.
SPECFORGE_CLONES void gemm(const float* __restrict__ A, int64_t lda, const float* __restrict__ B, int64_t ldb,
                           float* __restrict__ C, int64_t ldc, int64_t M, int64_t N, int64_t K, bool accumulate) {
  for (int64_t i0 = 0; i0 < M; i0 += kGemmRows) {
    const float* a[kGemmRows] = {A + i0 * lda, A + (i0 + 1) * lda, A + (i0 + 2) * lda, A + (i0 + 3) * lda};
    float* c[kGemmRows] = {C + i0 * ldc, C + (i0 + 1) * ldc, C + (i0 + 2) * ldc, C + (i0 + 3) * ldc};
    int64_t j0 = 0;
    for (; j0 + kGemmCols <= N; j0 += kGemmCols) {
      vec8 acc[kGemmRows][2] = {};
      if (accumulate)
        for (int r = 0; r < kGemmRows; ++r) std::memcpy(acc[r], c[r] + j0, sizeof(acc[r]));
      for (int64_t k = 0; k < K; ++k) {
        vec8 b[2];
        std::memcpy(b, B + k * ldb + j0, sizeof(b));
        for (int r = 0; r < kGemmRows; ++r) {
          const float x = a[r][k];
          acc[r][0] += x * b[0];
          acc[r][1] += x * b[1];
        }
      }
      for (int r = 0; r < kGemmRows; ++r) std::memcpy(c[r] + j0, acc[r], sizeof(acc[r]));
    }
    for (; j0 < N; ++j0)  // the ragged end of a head dim that is not a multiple of 16
      for (int r = 0; r < kGemmRows; ++r) {
        float sum = accumulate ? c[r][j0] : 0.f;
        for (int64_t k = 0; k < K; ++k) sum += a[r][k] * B[k * ldb + j0];
        c[r][j0] = sum;
      }
  }
}

// x[j] <- exp(x[j] - shift) for j < n. std::exp does not vectorise without -ffast-math, so this is the
// classic range reduction exp(y) = 2^k exp(r), |r| <= ln2/2, with a degree-6 polynomial (Cephes expf
// coefficients, relative error ~1e-7). y below -87 (and -inf) gives 0.
SPECFORGE_CLONES void exp_shifted(float* __restrict__ x, int64_t n, float shift) {
  const vec8 zero = {}, lo = zero - 87.f, hi = zero + 88.f;
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float kRound = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  for (int64_t j = 0; j < n; j += 8) {
    // The last, partial block goes through a local copy, so every load and store is a whole vector.
    float tail[8] = {};
    const bool partial = n - j < 8;
    float* block = partial ? tail : x + j;
    if (partial) std::copy(x + j, x + n, tail);
    vec8 y;
    std::memcpy(&y, block, sizeof(y));
    y -= shift;
    const vec8 yc = y < lo ? lo : (y > hi ? hi : y);
    const vec8 k = (yc * kLog2e + kRound) - kRound;
    const vec8 r = (yc - k * kLn2Hi) - k * kLn2Lo;
    vec8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const ivec8 bits = (__builtin_convertvector(k, ivec8) + 127) << 23;
    vec8 two_k;
    std::memcpy(&two_k, &bits, sizeof(two_k));
    const vec8 result = y < lo ? zero : p * two_k;
    std::memcpy(block, &result, sizeof(result));
    if (partial) std::copy(tail, tail + (n - j), x + j);
  }
}

SPECFORGE_CLONES float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t D) {
  // Eight partial sums so the reduction vectorises without reassociation flags.
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[d + u] * b[d + u];
  float total = 0.f;
  for (; d < D; ++d) total += a[d] * b[d];
  for (int u = 0; u < 8; ++u) total += acc[u];
  return total;
}

SPECFORGE_CLONES void axpy(float alpha, const float* __restrict__ x, float* __restrict__ y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += alpha * x[d];
}

// dst [rows_pad, D] <- `rows` rows of D elements (row r at src + r * stride) times `mul`, in fp32;
// rows past `rows` are zero.
template <typename scalar_t>
void load_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t rows_pad, int64_t D, float mul,
               float* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * D + d] = mul * static_cast<float>(src[r * stride + d]);
  std::fill(dst + rows * D, dst + rows_pad * D, 0.f);
}

// dst [D, kTileK] <- the same rows transposed; columns past `rows` are zero.
template <typename scalar_t>
void load_rows_transposed(const scalar_t* src, int64_t stride, int64_t rows, int64_t D, float* dst) {
  std::fill(dst, dst + D * kTileK, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[d * kTileK + r] = static_cast<float>(src[r * stride + d]);
}

// dst [kTileK, kTileQ] <- src [kTileQ, kTileK] transposed.
void transpose_tile(const float* src, float* dst) {
  for (int i = 0; i < kTileQ; ++i)
    for (int j = 0; j < kTileK; ++j) dst[j * kTileQ + i] = src[i * kTileK + j];
}

// Keys kb .. kb + nk - 1 that query t sees (a prefix of the tile: keys up to t).
int visible_keys(int64_t t, int64_t kb, int64_t nk) {
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(nk, t - kb + 1)));
}

// Backward on one (query tile, key tile) pair, in place: S <- P = exp(S - lse) and dP <- dS = P (dP - delta)
// on each row's visible keys, zero elsewhere (including the padding rows up to rows_pad).
void probabilities_and_ds(float* S, float* dP, int64_t rows, int64_t rows_pad, int64_t q_begin, int64_t kb,
                          int64_t nk, const float* lse, const float* delta) {
  for (int64_t i = 0; i < rows_pad; ++i) {
    float* s = S + i * kTileK;
    float* dp = dP + i * kTileK;
    const int visible = i < rows ? visible_keys(q_begin + i, kb, nk) : 0;
    if (visible > 0) {
      exp_shifted(s, visible, lse[q_begin + i]);
      const float row_delta = delta[q_begin + i];
      for (int j = 0; j < visible; ++j) dp[j] = s[j] * (dp[j] - row_delta);
    }
    std::fill(s + visible, s + kTileK, 0.f);
    std::fill(dp + visible, dp + kTileK, 0.f);
  }
}

// One buffer per thread, from the torch allocator so the benchmark's peak memory counts it.
struct Scratch {
  at::Tensor buffer;
  int64_t per_thread;
  Scratch(int64_t floats, int threads) : buffer(at::empty({threads, floats}, at::kFloat)), per_thread(floats) {}
  float* thread_slice(int thread) { return buffer.data_ptr<float>() + thread * per_thread; }
};

template <typename F>
void parallel_over(int64_t n, int threads, F&& body) {
  // Causal work grows along a document, so hand out items one at a time instead of in equal blocks.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t item = 0; item < n; ++item) body(item, omp_get_thread_num());
}

// ----------------------------------------------------------------------------------------------
// CPU forward
// ----------------------------------------------------------------------------------------------

template <typename scalar_t>
void forward_cpu(const at::Tensor& q, const at::Tensor& k0, const at::Tensor& v0, const at::Tensor& kd,
                 const at::Tensor& vd, const std::vector<Tile>& tiles, const Dims& dm, float scale,
                 at::Tensor& out, at::Tensor& lse) {
  const int64_t T = dm.T, Hq = dm.Hq, Hkv = dm.Hkv, D = dm.D;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* k0p = k0.data_ptr<scalar_t>();
  const scalar_t* v0p = v0.data_ptr<scalar_t>();
  const scalar_t* kdp = kd.data_ptr<scalar_t>();
  const scalar_t* vdp = vd.data_ptr<scalar_t>();
  scalar_t* outp = out.data_ptr<scalar_t>();
  float* lsep = lse.data_ptr<float>();

  const int threads = at::get_num_threads();
  // Q, O [kTileQ, D]; KT [D, kTileK]; V [kTileK, D]; S [kTileQ, kTileK]; m, l; two diagonal rows.
  const int64_t floats = 2 * kTileQ * D + 2 * kTileK * D + kTileQ * kTileK + 2 * kTileQ + 2 * D;
  Scratch scratch(floats, threads);

  parallel_over(static_cast<int64_t>(tiles.size()) * Hq, threads, [&](int64_t item, int thread) {
    const Tile& tile = tiles[item / Hq];
    const int64_t h = item % Hq, g = h / dm.group;
    const int64_t rows = tile.end - tile.begin, rows_pad = round_up(rows, kGemmRows);
    float* Q = scratch.thread_slice(thread);
    float* O = Q + kTileQ * D;
    float* KT = O + kTileQ * D;
    float* V = KT + kTileK * D;
    float* S = V + kTileK * D;
    float* m = S + kTileQ * kTileK;
    float* l = m + kTileQ;
    float* kd_row = l + kTileQ;
    float* vd_row = kd_row + D;

    load_rows(qp + (tile.begin * Hq + h) * D, Hq * D, rows, rows_pad, D, scale, Q);
    std::fill(O, O + rows_pad * D, 0.f);
    std::fill(m, m + rows, kNegInf);
    std::fill(l, l + rows, 0.f);

    // Keys after the tile's last row are visible to none of its rows.
    for (int64_t kb = tile.doc_begin; kb < tile.end; kb += kTileK) {
      const int64_t nk = std::min<int64_t>(kTileK, tile.end - kb);
      load_rows_transposed(k0p + (kb * Hkv + g) * D, Hkv * D, nk, D, KT);
      load_rows(v0p + (kb * Hkv + g) * D, Hkv * D, nk, nk, D, 1.f, V);
      gemm(Q, D, KT, kTileK, S, kTileK, rows_pad, kTileK, D, false);
      for (int64_t i = 0; i < rows_pad; ++i) {
        float* s = S + i * kTileK;
        const int visible = i < rows ? visible_keys(tile.begin + i, kb, nk) : 0;
        if (visible > 0) {
          // Online softmax: rescale what was accumulated under the old running max.
          const float m_new = std::max(m[i], *std::max_element(s, s + visible));
          const float alpha = std::exp(m[i] - m_new);  // 0 on the first tile (m = -inf)
          exp_shifted(s, visible, m_new);
          float sum = 0.f;
          for (int j = 0; j < visible; ++j) sum += s[j];
          l[i] = l[i] * alpha + sum;
          m[i] = m_new;
          if (alpha != 1.f)
            for (int64_t d = 0; d < D; ++d) O[i * D + d] *= alpha;
        }
        std::fill(s + visible, s + kTileK, 0.f);
      }
      gemm(S, kTileK, V, D, O, D, rows_pad, D, nk, true);
    }

    // Diagonal keys of steps 1..i: one extra key per (row, step), merged into the same m and l.
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t t = tile.begin + i;
      float* o = O + i * D;
      for (int64_t j = 0; j < dm.n_diag; ++j) {
        const int64_t off = ((j * T + t) * Hkv + g) * D;
        load_rows(kdp + off, D, 1, 1, D, 1.f, kd_row);
        load_rows(vdp + off, D, 1, 1, D, 1.f, vd_row);
        const float s = dot(Q + i * D, kd_row, D);
        const float m_new = std::max(m[i], s);
        const float alpha = std::exp(m[i] - m_new), p = std::exp(s - m_new);
        l[i] = l[i] * alpha + p;
        m[i] = m_new;
        for (int64_t d = 0; d < D; ++d) o[d] = o[d] * alpha + p * vd_row[d];
      }
      const float inv = 1.f / l[i];
      scalar_t* dst = outp + (t * Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
      lsep[h * T + t] = m[i] + std::log(l[i]);
    }
  });
}

// ----------------------------------------------------------------------------------------------
// CPU backward
// ----------------------------------------------------------------------------------------------

template <typename scalar_t>
void backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k0, const at::Tensor& v0,
                  const at::Tensor& kd, const at::Tensor& vd, const at::Tensor& out, const at::Tensor& lse,
                  const at::Tensor& cu_seqlens, const Dims& dm, float scale, at::Tensor& dq, at::Tensor& dk0,
                  at::Tensor& dv0, at::Tensor& dkd_f32, at::Tensor& dvd_f32) {
  const int64_t T = dm.T, Hq = dm.Hq, Hkv = dm.Hkv, D = dm.D, G = dm.group;
  const scalar_t* dop = dout.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* k0p = k0.data_ptr<scalar_t>();
  const scalar_t* v0p = v0.data_ptr<scalar_t>();
  const scalar_t* kdp = kd.data_ptr<scalar_t>();
  const scalar_t* vdp = vd.data_ptr<scalar_t>();
  const scalar_t* outp = out.data_ptr<scalar_t>();
  const float* lsep = lse.data_ptr<float>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dk0p = dk0.data_ptr<scalar_t>();
  scalar_t* dv0p = dv0.data_ptr<scalar_t>();
  float* dkdp = dkd_f32.data_ptr<float>();
  float* dvdp = dvd_f32.data_ptr<float>();
  const int threads = at::get_num_threads();

  // delta[h, t] = dO . O, the softmax-backward correction of each row.
  at::Tensor delta = at::empty({Hq, T}, at::kFloat);
  float* deltap = delta.data_ptr<float>();
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < Hq; ++h) {
        const scalar_t* a = dop + (t * Hq + h) * D;
        const scalar_t* b = outp + (t * Hq + h) * D;
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<float>(a[d]) * static_cast<float>(b[d]);
        deltap[h * T + t] = acc;
      }
  });

  // Q, dO, acc [kTileQ, D]; K [kTileK, D]; KT, VT [D, kTileK]; S, dP, and their transposes
  // [kTileQ * kTileK each]; two diagonal rows.
  const int64_t floats = 3 * kTileQ * D + 3 * kTileK * D + 4 * kTileQ * kTileK + 2 * D;
  Scratch scratch(floats, threads);
  struct Buffers {
    float *Q, *dO, *acc, *K, *KT, *VT, *S, *dP, *PT, *dST, *kd_row, *vd_row;
  };
  auto buffers = [&](int thread) {
    Buffers b;
    b.Q = scratch.thread_slice(thread);
    b.dO = b.Q + kTileQ * D;
    b.acc = b.dO + kTileQ * D;
    b.K = b.acc + kTileQ * D;
    b.KT = b.K + kTileK * D;
    b.VT = b.KT + kTileK * D;
    b.S = b.VT + kTileK * D;
    b.dP = b.S + kTileQ * kTileK;
    b.PT = b.dP + kTileQ * kTileK;
    b.dST = b.PT + kTileQ * kTileK;
    b.kd_row = b.dST + kTileQ * kTileK;
    b.vd_row = b.kd_row + D;
    return b;
  };

  // Pass 1, per (query tile, kv head): dq over the causal keys, then the diagonal terms, whose dkd/dvd
  // are summed over the group's query heads inside this one work item.
  const std::vector<Tile> q_tiles = document_tiles(cu_seqlens, T, kTileQ);
  parallel_over(static_cast<int64_t>(q_tiles.size()) * Hkv, threads, [&](int64_t item, int thread) {
    const Tile& tile = q_tiles[item / Hkv];
    const int64_t g = item % Hkv, rows = tile.end - tile.begin, rows_pad = round_up(rows, kGemmRows);
    Buffers b = buffers(thread);
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      const float* row_lse = lsep + h * T;
      const float* row_delta = deltap + h * T;
      load_rows(qp + (tile.begin * Hq + h) * D, Hq * D, rows, rows_pad, D, scale, b.Q);
      load_rows(dop + (tile.begin * Hq + h) * D, Hq * D, rows, rows_pad, D, 1.f, b.dO);
      std::fill(b.acc, b.acc + rows_pad * D, 0.f);
      for (int64_t kb = tile.doc_begin; kb < tile.end; kb += kTileK) {
        const int64_t nk = std::min<int64_t>(kTileK, tile.end - kb);
        load_rows(k0p + (kb * Hkv + g) * D, Hkv * D, nk, nk, D, 1.f, b.K);
        load_rows_transposed(k0p + (kb * Hkv + g) * D, Hkv * D, nk, D, b.KT);
        load_rows_transposed(v0p + (kb * Hkv + g) * D, Hkv * D, nk, D, b.VT);
        gemm(b.Q, D, b.KT, kTileK, b.S, kTileK, rows_pad, kTileK, D, false);
        gemm(b.dO, D, b.VT, kTileK, b.dP, kTileK, rows_pad, kTileK, D, false);
        probabilities_and_ds(b.S, b.dP, rows, rows_pad, tile.begin, kb, nk, row_lse, row_delta);
        gemm(b.dP, kTileK, b.K, D, b.acc, D, rows_pad, D, nk, true);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t t = tile.begin + i;
        const float* qi = b.Q + i * D;
        const float* doi = b.dO + i * D;
        for (int64_t j = 0; j < dm.n_diag; ++j) {
          const int64_t off = ((j * T + t) * Hkv + g) * D;
          load_rows(kdp + off, D, 1, 1, D, 1.f, b.kd_row);
          load_rows(vdp + off, D, 1, 1, D, 1.f, b.vd_row);
          const float p = std::exp(dot(qi, b.kd_row, D) - row_lse[t]);
          const float ds = p * (dot(doi, b.vd_row, D) - row_delta[t]);
          axpy(ds, b.kd_row, b.acc + i * D, D);
          axpy(ds, qi, dkdp + off, D);  // qi already carries the scale
          axpy(p, doi, dvdp + off, D);
        }
        scalar_t* dst = dqp + (t * Hq + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(scale * b.acc[i * D + d]);
      }
    }
  });

  // Pass 2, per (key tile, kv head): dk0/dv0 from every later query of the document and of the group.
  const std::vector<Tile> k_tiles = document_tiles(cu_seqlens, T, kTileK);
  parallel_over(static_cast<int64_t>(k_tiles.size()) * Hkv, threads, [&](int64_t item, int thread) {
    const Tile& ktile = k_tiles[item / Hkv];
    const int64_t g = item % Hkv, kb = ktile.begin, nk = ktile.end - ktile.begin;
    const int64_t nk_pad = round_up(nk, kGemmRows);
    Buffers b = buffers(thread);
    float* dK = b.acc;  // [kTileK, D], in the query-sized accumulator
    float* dV = b.K;    // [kTileK, D]
    static_assert(kTileQ == kTileK, "pass 2 keeps key-tile accumulators in query-tile buffers");
    std::fill(dK, dK + nk_pad * D, 0.f);
    std::fill(dV, dV + nk_pad * D, 0.f);
    load_rows_transposed(k0p + (kb * Hkv + g) * D, Hkv * D, nk, D, b.KT);
    load_rows_transposed(v0p + (kb * Hkv + g) * D, Hkv * D, nk, D, b.VT);
    for (int64_t h = g * G; h < (g + 1) * G; ++h) {
      for (int64_t qb = kb; qb < ktile.doc_end; qb += kTileQ) {
        const int64_t rows = std::min<int64_t>(kTileQ, ktile.doc_end - qb);
        const int64_t rows_pad = round_up(rows, kGemmRows);
        load_rows(qp + (qb * Hq + h) * D, Hq * D, rows, rows_pad, D, scale, b.Q);
        load_rows(dop + (qb * Hq + h) * D, Hq * D, rows, rows_pad, D, 1.f, b.dO);
        gemm(b.Q, D, b.KT, kTileK, b.S, kTileK, rows_pad, kTileK, D, false);
        gemm(b.dO, D, b.VT, kTileK, b.dP, kTileK, rows_pad, kTileK, D, false);
        probabilities_and_ds(b.S, b.dP, rows, rows_pad, qb, kb, nk, lsep + h * T, deltap + h * T);
        // Only the first rows_pad rows of S and dP were written; the rest of the tile is stale.
        std::fill(b.S + rows_pad * kTileK, b.S + kTileQ * kTileK, 0.f);
        std::fill(b.dP + rows_pad * kTileK, b.dP + kTileQ * kTileK, 0.f);
        transpose_tile(b.S, b.PT);
        transpose_tile(b.dP, b.dST);
        gemm(b.PT, kTileQ, b.dO, D, dV, D, nk_pad, D, rows, true);
        gemm(b.dST, kTileQ, b.Q, D, dK, D, nk_pad, D, rows, true);  // Q carries the scale
      }
    }
    for (int64_t r = 0; r < nk; ++r) {
      scalar_t* dk = dk0p + ((kb + r) * Hkv + g) * D;
      scalar_t* dv = dv0p + ((kb + r) * Hkv + g) * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] = static_cast<scalar_t>(dK[r * D + d]);
        dv[d] = static_cast<scalar_t>(dV[r * D + d]);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Op implementations
// ----------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& q_in, const at::Tensor& k0_in,
                                           const at::Tensor& v0_in, const at::Tensor& kd_in,
                                           const at::Tensor& vd_in, const at::Tensor& cu_seqlens, double scale) {
  const Dims dm = check_inputs(q_in, k0_in, v0_in, kd_in, vd_in, cu_seqlens);
  const at::Tensor q = q_in.contiguous(), k0 = k0_in.contiguous(), v0 = v0_in.contiguous();
  const at::Tensor kd = kd_in.contiguous(), vd = vd_in.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({dm.Hq, dm.T}, q.options().dtype(at::kFloat));
  const std::vector<Tile> tiles = document_tiles(cu_seqlens, dm.T, kTileQ);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "ttt_attention_fwd_cpu", [&] {
    forward_cpu<scalar_t>(q, k0, v0, kd, vd, tiles, dm, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k0_in, const at::Tensor& v0_in,
    const at::Tensor& kd_in, const at::Tensor& vd_in, const at::Tensor& cu_seqlens, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale) {
  const Dims dm = check_inputs(q_in, k0_in, v0_in, kd_in, vd_in, cu_seqlens);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "ttt_attention_bwd: dout and out must be shaped like q ", q_in.sizes());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == dm.Hq && lse_in.size(1) == dm.T &&
                  lse_in.scalar_type() == at::kFloat,
              "ttt_attention_bwd: lse must be float32 [Hq, T], got ", lse_in.sizes());
  const at::Tensor q = q_in.contiguous(), k0 = k0_in.contiguous(), v0 = v0_in.contiguous();
  const at::Tensor kd = kd_in.contiguous(), vd = vd_in.contiguous();
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty_like(q), dk0 = at::empty_like(k0), dv0 = at::empty_like(v0);
  // The diagonal grads are summed over the group's heads in fp32, straight into the result for fp32.
  const bool fp32 = q.scalar_type() == at::kFloat;
  at::Tensor dkd = at::zeros(kd.sizes(), kd.options().dtype(at::kFloat));
  at::Tensor dvd = at::zeros(vd.sizes(), vd.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "ttt_attention_bwd_cpu", [&] {
    backward_cpu<scalar_t>(dout, q, k0, v0, kd, vd, out, lse, cu_seqlens, dm, static_cast<float>(scale), dq,
                           dk0, dv0, dkd, dvd);
  });
  if (!fp32) {
    dkd = dkd.to(q.scalar_type());
    dvd = dvd.to(q.scalar_type());
  }
  return {dq, dk0, dv0, dkd, dvd};
}

#ifdef SPECFORGE_WITH_CUDA

cuda_ttt::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda_ttt::DType::kFloat32;
    case at::kBFloat16:
      return cuda_ttt::DType::kBFloat16;
    case at::kHalf:
      return cuda_ttt::DType::kFloat16;
    default:
      TORCH_CHECK(false, "ttt_attention: dtype ", t, " is not float32, bfloat16 or float16");
  }
}

cuda_ttt::Shape cuda_shape(const Dims& dm, const at::Tensor& cu_seqlens, double scale) {
  cuda_ttt::Shape shape;
  shape.tokens = static_cast<int>(dm.T);
  shape.q_heads = static_cast<int>(dm.Hq);
  shape.kv_heads = static_cast<int>(dm.Hkv);
  shape.head_dim = static_cast<int>(dm.D);
  shape.n_diag = static_cast<int>(dm.n_diag);
  shape.n_docs = static_cast<int>(cu_seqlens.size(0) - 1);
  shape.scale = static_cast<float>(scale);
  return shape;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ttt_attention ", what, ": ", cudaGetErrorString(err));
}

// cu_seqlens is trusted on the GPU (checking it would need a device sync): the Python wrapper builds it.
std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& q_in, const at::Tensor& k0_in,
                                            const at::Tensor& v0_in, const at::Tensor& kd_in,
                                            const at::Tensor& vd_in, const at::Tensor& cu_in, double scale) {
  const Dims dm = check_inputs(q_in, k0_in, v0_in, kd_in, vd_in, cu_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k0 = k0_in.contiguous(), v0 = v0_in.contiguous();
  const at::Tensor kd = kd_in.contiguous(), vd = vd_in.contiguous(), cu = cu_in.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({dm.Hq, dm.T}, q.options().dtype(at::kFloat));
  if (dm.T == 0) return {out, lse};
  check_cuda(cuda_ttt::forward(cuda_dtype(q.scalar_type()), cuda_shape(dm, cu, scale), q.data_ptr(),
                               k0.data_ptr(), v0.data_ptr(), kd.data_ptr(), vd.data_ptr(), cu.data_ptr<int32_t>(),
                               out.data_ptr(), lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "forward");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k0_in, const at::Tensor& v0_in,
    const at::Tensor& kd_in, const at::Tensor& vd_in, const at::Tensor& cu_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale) {
  const Dims dm = check_inputs(q_in, k0_in, v0_in, kd_in, vd_in, cu_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "ttt_attention_bwd: dout and out must be shaped like q ", q_in.sizes());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == dm.Hq && lse_in.size(1) == dm.T &&
                  lse_in.scalar_type() == at::kFloat,
              "ttt_attention_bwd: lse must be float32 [Hq, T], got ", lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k0 = k0_in.contiguous(), v0 = v0_in.contiguous();
  const at::Tensor kd = kd_in.contiguous(), vd = vd_in.contiguous(), cu = cu_in.contiguous();
  const at::Tensor dout = dout_in.to(q.scalar_type()).contiguous(), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq = at::empty_like(q), dk0 = at::empty_like(k0), dv0 = at::empty_like(v0);
  at::Tensor delta = at::empty({dm.Hq, dm.T}, q.options().dtype(at::kFloat));
  // The diagonal grads collect every head of a group with atomics, in fp32.
  at::Tensor dkd = at::zeros(kd.sizes(), kd.options().dtype(at::kFloat));
  at::Tensor dvd = at::zeros(vd.sizes(), vd.options().dtype(at::kFloat));
  if (dm.T > 0) {
    check_cuda(cuda_ttt::backward(cuda_dtype(q.scalar_type()), cuda_shape(dm, cu, scale), dout.data_ptr(),
                                  q.data_ptr(), k0.data_ptr(), v0.data_ptr(), kd.data_ptr(), vd.data_ptr(),
                                  cu.data_ptr<int32_t>(), out.data_ptr(), lse.data_ptr<float>(),
                                  delta.data_ptr<float>(), dq.data_ptr(), dk0.data_ptr(), dv0.data_ptr(),
                                  dkd.data_ptr<float>(), dvd.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "backward");
  }
  if (q.scalar_type() != at::kFloat) {
    dkd = dkd.to(q.scalar_type());
    dvd = dvd.to(q.scalar_type());
  }
  return {dq, dk0, dv0, dkd, dvd};
}

#endif  // SPECFORGE_WITH_CUDA

}  // namespace

TORCH_LIBRARY(specforge_mcore, m) {
  // Importing this module registers the fake kernels and the autograd formula.
  m.set_python_module("specforge_mcore.ops.ttt_attention");
  m.def(
      "ttt_attention_fwd(Tensor q, Tensor k0, Tensor v0, Tensor kd, Tensor vd, Tensor cu_seqlens, float scale)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "ttt_attention_bwd(Tensor dout, Tensor q, Tensor k0, Tensor v0, Tensor kd, Tensor vd, Tensor cu_seqlens,"
      " Tensor out, Tensor lse, float scale) -> (Tensor dq, Tensor dk0, Tensor dv0, Tensor dkd, Tensor dvd)");
}

TORCH_LIBRARY_IMPL(specforge_mcore, CPU, m) {
  m.impl("ttt_attention_fwd", &fwd_cpu);
  m.impl("ttt_attention_bwd", &bwd_cpu);
}

#ifdef SPECFORGE_WITH_CUDA
TORCH_LIBRARY_IMPL(specforge_mcore, CUDA, m) {
  m.impl("ttt_attention_fwd", &fwd_cuda);
  m.impl("ttt_attention_bwd", &bwd_cuda);
}
#endif

}  // namespace specforge_mcore

// specforge_mcore._C is imported only for the registrations above; it has no Python functions.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
