// CUDA kernels of the TTT attention (layouts and semantics: the top of ttt_attention.cpp).
//
// Flash-style and fp32 inside: inputs are fp32/bf16/fp16, converted on load into shared memory.
// A block is 4 warps. Forward and dq: one block per (query tile, q head); each warp owns RPW query rows
// and each lane one key of the current 32-key tile, so a score is one lane's dot product over the head
// dim; the running max/sum per row are warp-uniform, and the value (or key) rows are accumulated with
// each lane owning head-dim slots lane + 32 k. The diagonal keys of steps 1..i are merged into the same
// running max/sum after the causal tiles. Backward recomputes probabilities from lse:
//   delta  = rowsum(dO * O)
//   dq     (query tiles; also dkd/dvd of the diagonal, summed over a group's heads with fp32 atomics)
//   dk0/dv0 (one block per (key tile, kv head), looping over the group's heads and later queries; no atomics)
// Extra memory is O(T * H) for lse/delta; nothing is O(T^2).
//
// This file needs only the CUDA toolkit headers so `nvcc -c` checks it on machines without a CUDA torch.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ttt_attention_cuda.h"

namespace specforge_mcore {
namespace cuda_ttt {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTileK = 32;  // keys (forward, dq) or queries (dk/dv) per tile: one per lane
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The document holding token t: the last b with cu[b] <= t (empty documents are skipped over).
__device__ __forceinline__ int document_of(const int32_t* cu, int n_docs, int t) {
  int lo = 0, hi = n_docs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

template <typename scalar_t>
struct Args {
  const scalar_t *q, *k0, *v0, *kd, *vd, *out, *dout;
  const int32_t* cu;
  const float* lse;
  scalar_t *out_w, *dq, *dk0, *dv0;
  float *lse_w, *delta, *dkd, *dvd;
  int tokens, q_heads, kv_heads, head_dim, n_diag, n_docs;
  float scale;
};

__device__ __forceinline__ int64_t row_offset(int token, int heads, int head, int head_dim) {
  return (static_cast<int64_t>(token) * heads + head) * head_dim;
}

__device__ __forceinline__ int64_t diag_offset(int step, int tokens, int token, int kv_heads, int head,
                                               int head_dim) {
  return ((static_cast<int64_t>(step) * tokens + token) * kv_heads + head) * head_dim;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, int NK, int RPW>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Args<scalar_t> a) {
  constexpr int kRows = kWarps * RPW;
  constexpr int kPad = 32 * NK;
  extern __shared__ float smem[];
  const int D = a.head_dim, ldk = D + 1;  // odd key stride: lanes reading different keys hit different banks
  float* Ks = smem;                       // [kTileK][D + 1]
  float* Vs = Ks + kTileK * ldk;          // [kTileK][kPad], zero past D
  float* Qs = Vs + kTileK * kPad;         // [kRows][D], pre-scaled

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, g = h / (a.q_heads / a.kv_heads);
  const int tile_begin = blockIdx.x * kRows;
  const int key_end = min(tile_begin + kRows, a.tokens);  // keys after the tile's last row are unseen
  const int key_begin = a.cu[document_of(a.cu, a.n_docs, tile_begin)];

  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int t = tile_begin + idx / D;
    Qs[idx] = t < a.tokens ? a.scale * to_float(a.q[row_offset(t, a.q_heads, h, D) + idx % D]) : 0.f;
  }

  int row_t[RPW], row_doc_begin[RPW];
  float m[RPW], l[RPW], acc[RPW][NK];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    row_t[r] = tile_begin + warp * RPW + r;
    // A row past T sees no key: its document "begins" after every key.
    row_doc_begin[r] = row_t[r] < a.tokens ? a.cu[document_of(a.cu, a.n_docs, row_t[r])] : a.tokens;
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int k = 0; k < NK; ++k) acc[r][k] = 0.f;
  }

  for (int kb = key_begin; kb < key_end; kb += kTileK) {
    __syncthreads();  // the previous tile is consumed (and Qs is written, on the first pass)
    for (int idx = threadIdx.x; idx < kTileK * kPad; idx += kThreads) {
      const int c = idx / kPad, d = idx % kPad, s = kb + c;
      const bool inside = s < key_end && d < D;
      const int64_t off = row_offset(s, a.kv_heads, g, D) + d;
      if (d < D) Ks[c * ldk + d] = inside ? to_float(a.k0[off]) : 0.f;
      Vs[c * kPad + d] = inside ? to_float(a.v0[off]) : 0.f;
    }
    __syncthreads();

    float score[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) score[r] = 0.f;
    const float* key = Ks + lane * ldk;
    const float* query = Qs + warp * RPW * D;
    for (int d = 0; d < D; ++d) {
      const float kv = key[d];
#pragma unroll
      for (int r = 0; r < RPW; ++r) score[r] += query[r * D + d] * kv;
    }

    const int s = kb + lane;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const bool visible = s >= row_doc_begin[r] && s <= row_t[r];
      const float x = visible ? score[r] : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(x));
      // A row that has seen no key yet keeps m = -inf; exp(-inf - -inf) would be NaN.
      const float p = m_new == -INFINITY ? 0.f : __expf(x - m_new);
      const float alpha = m_new == -INFINITY ? 1.f : __expf(m[r] - m_new);
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = m_new;
#pragma unroll
      for (int k = 0; k < NK; ++k) acc[r][k] *= alpha;
      score[r] = p;
    }

    for (int c = 0; c < kTileK; ++c) {
      const float* value = Vs + c * kPad + lane;
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float p = __shfl_sync(kFullMask, score[r], c);
#pragma unroll
        for (int k = 0; k < NK; ++k) acc[r][k] += p * value[32 * k];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int t = row_t[r];
    if (t >= a.tokens) continue;  // warp-uniform, so the shuffles below stay converged
    const float* query = Qs + (warp * RPW + r) * D;
    for (int j = 0; j < a.n_diag; ++j) {
      const int64_t base = diag_offset(j, a.tokens, t, a.kv_heads, g, D);
      float part = 0.f;
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        const int d = lane + 32 * k;
        if (d < D) part += query[d] * to_float(a.kd[base + d]);
      }
      const float x = warp_sum(part);
      const float m_new = fmaxf(m[r], x);
      const float alpha = __expf(m[r] - m_new), p = __expf(x - m_new);
      l[r] = l[r] * alpha + p;
      m[r] = m_new;
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        const int d = lane + 32 * k;
        acc[r][k] = acc[r][k] * alpha + (d < D ? p * to_float(a.vd[base + d]) : 0.f);
      }
    }
    const float inv = 1.f / l[r];
#pragma unroll
    for (int k = 0; k < NK; ++k) {
      const int d = lane + 32 * k;
      if (d < D) a.out_w[row_offset(t, a.q_heads, h, D) + d] = from_float<scalar_t>(acc[r][k] * inv);
    }
    if (lane == 0) a.lse_w[static_cast<int64_t>(h) * a.tokens + t] = m[r] + logf(l[r]);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]; one warp per (t, h).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) delta_kernel(const Args<scalar_t> a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // t * Hq + h
  if (row >= static_cast<int64_t>(a.tokens) * a.q_heads) return;  // whole warps leave together
  const int lane = threadIdx.x % 32, D = a.head_dim;
  float part = 0.f;
  for (int d = lane; d < D; d += 32) part += to_float(a.dout[row * D + d]) * to_float(a.out[row * D + d]);
  const float total = warp_sum(part);
  if (lane == 0) {
    const int64_t t = row / a.q_heads, h = row % a.q_heads;
    a.delta[h * a.tokens + t] = total;
  }
}

// dq over the causal keys and the diagonal terms (dq, dkd, dvd). One block per (query tile, q head).
template <typename scalar_t, int NK, int RPW>
__global__ void __launch_bounds__(kThreads) dq_kernel(const Args<scalar_t> a) {
  constexpr int kRows = kWarps * RPW;
  extern __shared__ float smem[];
  const int D = a.head_dim, ldk = D + 1;
  float* Ks = smem;               // [kTileK][D + 1]
  float* Vs = Ks + kTileK * ldk;  // [kTileK][D + 1]
  float* Qs = Vs + kTileK * ldk;  // [kRows][D], pre-scaled
  float* dOs = Qs + kRows * D;    // [kRows][D]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, g = h / (a.q_heads / a.kv_heads);
  const int tile_begin = blockIdx.x * kRows;
  const int key_end = min(tile_begin + kRows, a.tokens);
  const int key_begin = a.cu[document_of(a.cu, a.n_docs, tile_begin)];

  for (int idx = threadIdx.x; idx < kRows * D; idx += kThreads) {
    const int t = tile_begin + idx / D;
    const int64_t off = row_offset(t, a.q_heads, h, D) + idx % D;
    Qs[idx] = t < a.tokens ? a.scale * to_float(a.q[off]) : 0.f;
    dOs[idx] = t < a.tokens ? to_float(a.dout[off]) : 0.f;
  }

  int row_t[RPW], row_doc_begin[RPW];
  float row_lse[RPW], row_delta[RPW], acc[RPW][NK];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int t = tile_begin + warp * RPW + r;
    const bool valid = t < a.tokens;
    row_t[r] = t;
    row_doc_begin[r] = valid ? a.cu[document_of(a.cu, a.n_docs, t)] : a.tokens;
    row_lse[r] = valid ? a.lse[static_cast<int64_t>(h) * a.tokens + t] : 0.f;
    row_delta[r] = valid ? a.delta[static_cast<int64_t>(h) * a.tokens + t] : 0.f;
#pragma unroll
    for (int k = 0; k < NK; ++k) acc[r][k] = 0.f;
  }

  for (int kb = key_begin; kb < key_end; kb += kTileK) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTileK * D; idx += kThreads) {
      const int c = idx / D, d = idx % D, s = kb + c;
      const int64_t off = row_offset(s, a.kv_heads, g, D) + d;
      Ks[c * ldk + d] = s < key_end ? to_float(a.k0[off]) : 0.f;
      Vs[c * ldk + d] = s < key_end ? to_float(a.v0[off]) : 0.f;
    }
    __syncthreads();

    float score[RPW], dp[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) score[r] = dp[r] = 0.f;
    const float* key = Ks + lane * ldk;
    const float* value = Vs + lane * ldk;
    const float* query = Qs + warp * RPW * D;
    const float* grad = dOs + warp * RPW * D;
    for (int d = 0; d < D; ++d) {
      const float kv = key[d], vv = value[d];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        score[r] += query[r * D + d] * kv;
        dp[r] += grad[r * D + d] * vv;
      }
    }
    const int s = kb + lane;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const bool visible = s >= row_doc_begin[r] && s <= row_t[r];
      const float p = visible ? __expf(score[r] - row_lse[r]) : 0.f;
      score[r] = p * (dp[r] - row_delta[r]);  // dS
    }
    for (int c = 0; c < kTileK; ++c) {
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float ds = __shfl_sync(kFullMask, score[r], c);
#pragma unroll
        for (int k = 0; k < NK; ++k) {
          const int d = lane + 32 * k;
          if (d < D) acc[r][k] += ds * Ks[c * ldk + d];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int t = row_t[r];
    if (t >= a.tokens) continue;  // warp-uniform
    const float* query = Qs + (warp * RPW + r) * D;
    const float* grad = dOs + (warp * RPW + r) * D;
    for (int j = 0; j < a.n_diag; ++j) {
      const int64_t base = diag_offset(j, a.tokens, t, a.kv_heads, g, D);
      float part_s = 0.f, part_dp = 0.f;
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        const int d = lane + 32 * k;
        if (d < D) {
          part_s += query[d] * to_float(a.kd[base + d]);
          part_dp += grad[d] * to_float(a.vd[base + d]);
        }
      }
      const float p = __expf(warp_sum(part_s) - row_lse[r]);
      const float ds = p * (warp_sum(part_dp) - row_delta[r]);
#pragma unroll
      for (int k = 0; k < NK; ++k) {
        const int d = lane + 32 * k;
        if (d < D) {
          acc[r][k] += ds * to_float(a.kd[base + d]);
          atomicAdd(a.dkd + base + d, ds * query[d]);  // query carries the scale
          atomicAdd(a.dvd + base + d, p * grad[d]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < NK; ++k) {
      const int d = lane + 32 * k;
      if (d < D) a.dq[row_offset(t, a.q_heads, h, D) + d] = from_float<scalar_t>(a.scale * acc[r][k]);
    }
  }
}

// dk0 and dv0. One block per (key tile, kv head); each warp owns RPW keys, each lane one query of the
// current 32-query tile; the group's query heads are summed inside the block.
template <typename scalar_t, int NK, int RPW>
__global__ void __launch_bounds__(kThreads) dkv_kernel(const Args<scalar_t> a) {
  constexpr int kKeys = kWarps * RPW;
  extern __shared__ float smem[];
  const int D = a.head_dim, ldq = D + 1;
  float* Ks = smem;               // [kKeys][D]
  float* Vs = Ks + kKeys * D;     // [kKeys][D]
  float* Qs = Vs + kKeys * D;     // [kTileK][D + 1], pre-scaled
  float* dOs = Qs + kTileK * ldq; // [kTileK][D + 1]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = blockIdx.y, group = a.q_heads / a.kv_heads;
  const int key_begin = blockIdx.x * kKeys;
  const int key_last = min(key_begin + kKeys, a.tokens) - 1;
  // Queries that see these keys: from the first key to the end of the last key's document.
  const int query_end = a.cu[document_of(a.cu, a.n_docs, key_last) + 1];

  for (int idx = threadIdx.x; idx < kKeys * D; idx += kThreads) {
    const int s = key_begin + idx / D;
    const int64_t off = row_offset(s, a.kv_heads, g, D) + idx % D;
    Ks[idx] = s < a.tokens ? to_float(a.k0[off]) : 0.f;
    Vs[idx] = s < a.tokens ? to_float(a.v0[off]) : 0.f;
  }

  int key_s[RPW], key_doc_end[RPW];
  float dk[RPW][NK], dv[RPW][NK];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    key_s[r] = key_begin + warp * RPW + r;
    // A key past T is seen by no query: its document "ends" before every query.
    key_doc_end[r] = key_s[r] < a.tokens ? a.cu[document_of(a.cu, a.n_docs, key_s[r]) + 1] : 0;
#pragma unroll
    for (int k = 0; k < NK; ++k) dk[r][k] = dv[r][k] = 0.f;
  }

  for (int h = g * group; h < (g + 1) * group; ++h) {
    for (int qb = key_begin; qb < query_end; qb += kTileK) {
      __syncthreads();
      for (int idx = threadIdx.x; idx < kTileK * D; idx += kThreads) {
        const int c = idx / D, d = idx % D, t = qb + c;
        const int64_t off = row_offset(t, a.q_heads, h, D) + d;
        Qs[c * ldq + d] = t < query_end ? a.scale * to_float(a.q[off]) : 0.f;
        dOs[c * ldq + d] = t < query_end ? to_float(a.dout[off]) : 0.f;
      }
      __syncthreads();

      const int t = qb + lane;
      const float t_lse = t < query_end ? a.lse[static_cast<int64_t>(h) * a.tokens + t] : 0.f;
      const float t_delta = t < query_end ? a.delta[static_cast<int64_t>(h) * a.tokens + t] : 0.f;
      float p[RPW], ds[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) p[r] = ds[r] = 0.f;
      const float* query = Qs + lane * ldq;
      const float* grad = dOs + lane * ldq;
      const float* key = Ks + warp * RPW * D;
      const float* value = Vs + warp * RPW * D;
      for (int d = 0; d < D; ++d) {
        const float qv = query[d], gv = grad[d];
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          p[r] += qv * key[r * D + d];   // score for now
          ds[r] += gv * value[r * D + d]; // dP for now
        }
      }
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const bool visible = t >= key_s[r] && t < key_doc_end[r];
        p[r] = visible ? __expf(p[r] - t_lse) : 0.f;
        ds[r] = p[r] * (ds[r] - t_delta);
      }
      for (int c = 0; c < kTileK; ++c) {
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const float pc = __shfl_sync(kFullMask, p[r], c);
          const float dsc = __shfl_sync(kFullMask, ds[r], c);
#pragma unroll
          for (int k = 0; k < NK; ++k) {
            const int d = lane + 32 * k;
            if (d < D) {
              dv[r][k] += pc * dOs[c * ldq + d];
              dk[r][k] += dsc * Qs[c * ldq + d];  // Qs carries the scale
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    if (key_s[r] >= a.tokens) continue;
#pragma unroll
    for (int k = 0; k < NK; ++k) {
      const int d = lane + 32 * k;
      if (d < D) {
        const int64_t off = row_offset(key_s[r], a.kv_heads, g, D) + d;
        a.dk0[off] = from_float<scalar_t>(dk[r][k]);
        a.dv0[off] = from_float<scalar_t>(dv[r][k]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

template <typename Kernel>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem_bytes, cudaStream_t stream, const void* args_ptr) {
  // Tiles for large head dims need more than the default 48 KiB of shared memory.
  cudaError_t err = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (err != cudaSuccess) return err;
  void* params[] = {const_cast<void*>(args_ptr)};
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, dim3(kThreads), params, smem_bytes, stream);
}

int blocks(int n, int per_block) { return (n + per_block - 1) / per_block; }

template <typename scalar_t, int NK, int RPW>
cudaError_t forward_tiled(const Args<scalar_t>& a, cudaStream_t stream) {
  constexpr int kRows = kWarps * RPW;
  const size_t D = static_cast<size_t>(a.head_dim);
  const size_t smem = sizeof(float) * (kTileK * (D + 1) + kTileK * 32 * NK + kRows * D);
  return launch(forward_kernel<scalar_t, NK, RPW>, dim3(blocks(a.tokens, kRows), a.q_heads), smem, stream, &a);
}

template <typename scalar_t, int NK, int RPW>
cudaError_t backward_tiled(const Args<scalar_t>& a, cudaStream_t stream) {
  constexpr int kRows = kWarps * RPW;
  const size_t D = static_cast<size_t>(a.head_dim);
  const int rows = a.tokens * a.q_heads;
  cudaError_t err = launch(delta_kernel<scalar_t>, dim3(blocks(rows, kWarps)), 0, stream, &a);
  if (err != cudaSuccess) return err;
  const size_t dq_smem = sizeof(float) * (2 * kTileK * (D + 1) + 2 * kRows * D);
  err = launch(dq_kernel<scalar_t, NK, RPW>, dim3(blocks(a.tokens, kRows), a.q_heads), dq_smem, stream, &a);
  if (err != cudaSuccess) return err;
  const size_t dkv_smem = sizeof(float) * (2 * kRows * D + 2 * kTileK * (D + 1));
  return launch(dkv_kernel<scalar_t, NK, RPW>, dim3(blocks(a.tokens, kRows), a.kv_heads), dkv_smem, stream, &a);
}

// Per-lane head-dim slots NK (D <= 32 NK) and rows per warp RPW, so that RPW * NK accumulators fit in
// registers.
template <typename scalar_t>
cudaError_t by_head_dim(const Args<scalar_t>& a, cudaStream_t stream, bool backward) {
  const int D = a.head_dim;
  if (D <= 32) return backward ? backward_tiled<scalar_t, 1, 8>(a, stream) : forward_tiled<scalar_t, 1, 8>(a, stream);
  if (D <= 64) return backward ? backward_tiled<scalar_t, 2, 8>(a, stream) : forward_tiled<scalar_t, 2, 8>(a, stream);
  if (D <= 128) return backward ? backward_tiled<scalar_t, 4, 8>(a, stream) : forward_tiled<scalar_t, 4, 8>(a, stream);
  if (D <= 256) return backward ? backward_tiled<scalar_t, 8, 4>(a, stream) : forward_tiled<scalar_t, 8, 4>(a, stream);
  return cudaErrorInvalidValue;
}

template <typename scalar_t>
Args<scalar_t> make_args(const Shape& shape, const void* q, const void* k0, const void* v0, const void* kd,
                         const void* vd, const int32_t* cu_seqlens) {
  Args<scalar_t> a{};
  a.q = static_cast<const scalar_t*>(q);
  a.k0 = static_cast<const scalar_t*>(k0);
  a.v0 = static_cast<const scalar_t*>(v0);
  a.kd = static_cast<const scalar_t*>(kd);
  a.vd = static_cast<const scalar_t*>(vd);
  a.cu = cu_seqlens;
  a.tokens = shape.tokens;
  a.q_heads = shape.q_heads;
  a.kv_heads = shape.kv_heads;
  a.head_dim = shape.head_dim;
  a.n_diag = shape.n_diag;
  a.n_docs = shape.n_docs;
  a.scale = shape.scale;
  return a;
}

template <typename scalar_t>
cudaError_t forward_typed(const Shape& shape, const void* q, const void* k0, const void* v0, const void* kd,
                          const void* vd, const int32_t* cu_seqlens, void* out, float* lse, cudaStream_t stream) {
  Args<scalar_t> a = make_args<scalar_t>(shape, q, k0, v0, kd, vd, cu_seqlens);
  a.out_w = static_cast<scalar_t*>(out);
  a.lse_w = lse;
  return by_head_dim(a, stream, false);
}

template <typename scalar_t>
cudaError_t backward_typed(const Shape& shape, const void* dout, const void* q, const void* k0, const void* v0,
                           const void* kd, const void* vd, const int32_t* cu_seqlens, const void* out,
                           const float* lse, float* delta, void* dq, void* dk0, void* dv0, float* dkd, float* dvd,
                           cudaStream_t stream) {
  Args<scalar_t> a = make_args<scalar_t>(shape, q, k0, v0, kd, vd, cu_seqlens);
  a.dout = static_cast<const scalar_t*>(dout);
  a.out = static_cast<const scalar_t*>(out);
  a.lse = lse;
  a.delta = delta;
  a.dq = static_cast<scalar_t*>(dq);
  a.dk0 = static_cast<scalar_t*>(dk0);
  a.dv0 = static_cast<scalar_t*>(dv0);
  a.dkd = dkd;
  a.dvd = dvd;
  return by_head_dim(a, stream, true);
}

}  // namespace

cudaError_t forward(DType dtype, const Shape& shape, const void* q, const void* k0, const void* v0,
                    const void* kd, const void* vd, const int32_t* cu_seqlens, void* out, float* lse,
                    cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed<float>(shape, q, k0, v0, kd, vd, cu_seqlens, out, lse, stream);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(shape, q, k0, v0, kd, vd, cu_seqlens, out, lse, stream);
    case DType::kFloat16:
      return forward_typed<__half>(shape, q, k0, v0, kd, vd, cu_seqlens, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(DType dtype, const Shape& shape, const void* dout, const void* q, const void* k0,
                     const void* v0, const void* kd, const void* vd, const int32_t* cu_seqlens, const void* out,
                     const float* lse, float* delta, void* dq, void* dk0, void* dv0, float* dkd, float* dvd,
                     cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(shape, dout, q, k0, v0, kd, vd, cu_seqlens, out, lse, delta, dq, dk0, dv0, dkd,
                                   dvd, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(shape, dout, q, k0, v0, kd, vd, cu_seqlens, out, lse, delta, dq, dk0,
                                           dv0, dkd, dvd, stream);
    case DType::kFloat16:
      return backward_typed<__half>(shape, dout, q, k0, v0, kd, vd, cu_seqlens, out, lse, delta, dq, dk0, dv0,
                                    dkd, dvd, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_ttt
}  // namespace specforge_mcore
