// Launchers of the CUDA TTT attention kernels (ttt_attention_cuda.cu).
//
// Plain pointers and CUDA runtime types only, so the .cu file builds with nvcc alone (no torch headers)
// and the bindings in ttt_attention.cpp own every tensor concern. All tensors are contiguous, in the
// layouts documented at the top of ttt_attention.cpp; `lse` and `delta` are fp32 [Hq, T].
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace specforge_mcore {
namespace cuda_ttt {

enum class DType { kFloat32, kBFloat16, kFloat16 };

struct Shape {
  int tokens;   // T, the packed length
  int q_heads;  // Hq
  int kv_heads; // Hkv, divides Hq
  int head_dim; // D <= 256
  int n_diag;   // diagonal steps, the leading dim of kd/vd
  int n_docs;   // cu_seqlens holds n_docs + 1 offsets
  float scale;
};

cudaError_t forward(DType dtype, const Shape& shape, const void* q, const void* k0, const void* v0,
                    const void* kd, const void* vd, const int32_t* cu_seqlens, void* out, float* lse,
                    cudaStream_t stream);

// dkd and dvd are fp32 and must be zero on entry (the diagonal grads are accumulated atomically);
// delta is fp32 [Hq, T] scratch.
cudaError_t backward(DType dtype, const Shape& shape, const void* dout, const void* q, const void* k0,
                     const void* v0, const void* kd, const void* vd, const int32_t* cu_seqlens, const void* out,
                     const float* lse, float* delta, void* dq, void* dk0, void* dv0, float* dkd, float* dvd,
                     cudaStream_t stream);

}  // namespace cuda_ttt
}  // namespace specforge_mcore
