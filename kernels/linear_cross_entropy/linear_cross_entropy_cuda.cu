// Row kernels of the fused linear + cross-entropy (apt/kernels/linear_cross_entropy.py), CUDA.
//
// No torch headers (FEASIBILITY.md: they do not compile for CUDA without a CUDA torch): raw
// pointers, the caller's stream, and a dtype code. The binding linear_cross_entropy_cuda.cpp
// computes each logits block with a cuBLAS matmul (torch.mm) and calls these launchers:
//   lce_stats_cuda         fold a block [rows, cols] into the per-row running max m, sum of
//                          exp(logit - m) s and target logit t (the online logsumexp);
//   lce_softmax_grad_cuda  turn a recomputed block in place into (softmax - onehot) * grad.
// One block of threads per row; fp32 math whatever the storage type. Each thread keeps its own
// (max, sum) pair over a strided walk of the row (one read of the row), then warp shuffles and
// shared memory combine the pairs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype_cuda.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;


// exp(x) as exp2(x * log2 e): one ex2.approx instruction (about 2 ulp).
__device__ __forceinline__ float exp_fast(float x) { return exp2f(x * kLog2e); }

// Combine two (max, sum of exp(x - max)) pairs; an empty pair is (-inf, 0).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // both empty: keep (-inf, 0), avoid exp(-inf - -inf)
  s = s * exp_fast(m - mx) + s2 * exp_fast(m2 - mx);
  m = mx;
}

// Up to 16 bytes per load (Pack, common/dtype_cuda.cuh) when the row allows it (cols a
// multiple of VEC, aligned base).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
stats_kernel(const T* __restrict__ logits, int64_t cols, const int64_t* __restrict__ labels,
             int64_t vocab_start, float* __restrict__ m_out, float* __restrict__ s_out,
             float* __restrict__ t_out) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * cols;
  float m = -INFINITY, s = 0.f;
  const Pack<T, VEC>* packs = reinterpret_cast<const Pack<T, VEC>*>(x);
  for (int64_t p = threadIdx.x; p < cols / VEC; p += kThreads) {
    const Pack<T, VEC> pack = packs[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = to_f(pack.v[k]);
      if (v > m) {  // rescale the running sum to the new max
        s = s * exp_fast(m - v) + 1.f;
        m = v;
      } else {
        s += exp_fast(v - m);
      }
    }
  }
  // warp, then block
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    merge(m, s, m2, s2);
  }
  __shared__ float shared_m[kWarps], shared_s[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) merge(m, s, shared_m[w], shared_s[w]);
    merge(m, s, m_out[row], s_out[row]);  // fold into the running stats of earlier blocks
    m_out[row] = m;
    s_out[row] = s;
    const int64_t local = labels[row] - vocab_start;
    if (local >= 0 && local < cols) t_out[row] += to_f(x[local]);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
softmax_grad_kernel(T* __restrict__ logits, int64_t cols, const int64_t* __restrict__ labels,
                    int64_t vocab_start, const float* __restrict__ lse,
                    const float* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * cols;
  const float row_lse = lse[row], g = grad[row];
  const int64_t local = labels[row] - vocab_start;
  Pack<T, VEC>* packs = reinterpret_cast<Pack<T, VEC>*>(x);
  for (int64_t p = threadIdx.x; p < cols / VEC; p += kThreads) {
    Pack<T, VEC> pack = packs[p];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float prob = exp_fast(to_f(pack.v[k]) - row_lse);
      const float onehot = (p * VEC + k == local) ? 1.f : 0.f;
      pack.v[k] = from_f<T>((prob - onehot) * g);
    }
    packs[p] = pack;
  }
}

template <typename T>
constexpr int full_vec() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T>
bool can_vectorise(const void* ptr, int64_t cols) {
  return cols % full_vec<T>() == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

template <typename T>
cudaError_t launch_stats(const void* logits, int64_t rows, int64_t cols, const int64_t* labels,
                         int64_t vocab_start, float* m, float* s, float* t,
                         cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  if (can_vectorise<T>(logits, cols)) {
    stats_kernel<T, full_vec<T>()><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, cols, labels, vocab_start,
                                                                  m, s, t);
  } else {
    stats_kernel<T, 1><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, cols, labels, vocab_start, m, s, t);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad(void* logits, int64_t rows, int64_t cols, const int64_t* labels,
                        int64_t vocab_start, const float* lse, const float* grad,
                        cudaStream_t stream) {
  T* x = static_cast<T*>(logits);
  if (can_vectorise<T>(logits, cols)) {
    softmax_grad_kernel<T, full_vec<T>()><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        x, cols, labels, vocab_start, lse, grad);
  } else {
    softmax_grad_kernel<T, 1><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, cols, labels, vocab_start,
                                                             lse, grad);
  }
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16 (the binding maps torch's dtype). Row-major,
// contiguous blocks; rows <= 2^31 - 1 (one CUDA block per row).
cudaError_t lce_stats_cuda(const void* logits, int dtype, int64_t rows, int64_t cols,
                           const int64_t* labels, int64_t vocab_start, float* m, float* s,
                           float* t, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case 0: return launch_stats<float>(logits, rows, cols, labels, vocab_start, m, s, t, stream);
    case 1:
      return launch_stats<__nv_bfloat16>(logits, rows, cols, labels, vocab_start, m, s, t,
                                         stream);
    case 2: return launch_stats<__half>(logits, rows, cols, labels, vocab_start, m, s, t, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t lce_softmax_grad_cuda(void* logits, int dtype, int64_t rows, int64_t cols,
                                  const int64_t* labels, int64_t vocab_start, const float* lse,
                                  const float* grad, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case 0: return launch_grad<float>(logits, rows, cols, labels, vocab_start, lse, grad, stream);
    case 1:
      return launch_grad<__nv_bfloat16>(logits, rows, cols, labels, vocab_start, lse, grad,
                                        stream);
    case 2: return launch_grad<__half>(logits, rows, cols, labels, vocab_start, lse, grad, stream);
    default: return cudaErrorInvalidValue;
  }
}
