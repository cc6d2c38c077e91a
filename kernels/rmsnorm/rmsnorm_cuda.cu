// Fused RMSNorm for CUDA, forward and backward. No torch headers (raw pointers and the
// caller's stream: it compiles in seconds with nvcc alone, see FEASIBILITY.md); the binding
// rmsnorm_cuda.cpp checks the tensors and calls the launchers at the bottom.
//
// One block per row in the forward: each thread loads up to K vectors of 16 bytes (VEC
// elements; VEC = 1 when the row or a pointer is not 16-byte aligned) once, keeps them in
// registers for the second pass, and the sum of squares is reduced with warp shuffles.
// The backward runs as many blocks as fit on the GPU at once, each striding over rows: dx
// per row, and dweight summed in registers over the block's rows, written as one fp32 partial
// row per block and added up by a second kernel (no atomics, deterministic).
// fp32 math for float / bfloat16 / half; cpp_extension defines __CUDA_NO_BFLOAT16_CONVERSIONS__,
// hence the explicit conversion intrinsics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype_cuda.cuh"

namespace {

// Per-thread register budget: K vectors of VEC elements; 16 when unvectorised so that rows of
// up to 16384 elements fit in 1024 threads either way (rmsnorm.py's CUDA_MAX_HIDDEN).
template <int VEC> __host__ __device__ constexpr int k_for() { return VEC == 1 ? 16 : 4; }
constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread; `red` is 32 floats of shared memory. Ends with
// a barrier so that the next call may reuse `red`.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
rms_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
            float* __restrict__ rstd, int h, float eps) {
  constexpr int K = k_for<VEC>();
  using P = Pack<T, VEC>;
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int nvec = h / VEC;
  const P* xr = reinterpret_cast<const P*>(x + row * h);
  const P* wr = reinterpret_cast<const P*>(w);
  P* yr = reinterpret_cast<P*>(y + row * h);
  P cache[K];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
      cache[k] = xr[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float f = to_f(cache[k].v[e]);
        ss += f * f;
      }
    }
  }
  ss = block_sum(ss, red);
  const float rs = rsqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
      const P wv = wr[i];
      P out;
#pragma unroll
      for (int e = 0; e < VEC; ++e) out.v[e] = from_f<T>(to_f(cache[k].v[e]) * rs * to_f(wv.v[e]));
      yr[i] = out;
    }
  }
}

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), xhat = x*rstd; partial[block] = sum dy*xhat.
// Registers go to the dweight sums (32 fp32 per thread, 512 threads: rows of up to 16384);
// the second pass re-reads x, dy and w, which the first pass left in L1/L2 (no DRAM cost),
// instead of keeping them in registers too, which spilled.
template <int VEC> __host__ __device__ constexpr int kb_for() { return 32 / VEC; }
constexpr int kMaxThreadsBackward = 512;

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreadsBackward)
rms_backward(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
             const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ partial,
             int64_t rows, int h) {
  constexpr int K = kb_for<VEC>();
  using P = Pack<T, VEC>;
  __shared__ float red[32];
  const int nvec = h / VEC;
  const P* wr = reinterpret_cast<const P*>(w);
  float acc[K][VEC];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[k][e] = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const P* xr = reinterpret_cast<const P*>(x + row * h);
    const P* gr = reinterpret_cast<const P*>(dy + row * h);
    P* dxr = reinterpret_cast<P*>(dx + row * h);
    const float rs = rstd[row];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < nvec) {
        const P xv = xr[i], gv = gr[i], wv = wr[i];
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot += to_f(gv.v[e]) * to_f(wv.v[e]) * to_f(xv.v[e]);
      }
    }
    dot = block_sum(dot, red);
    const float c = dot * rs / static_cast<float>(h);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < nvec) {
        const P xv = xr[i], gv = gr[i], wv = wr[i];
        P out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float g = to_f(gv.v[e]);
          const float xhat = to_f(xv.v[e]) * rs;
          out.v[e] = from_f<T>(rs * (g * to_f(wv.v[e]) - xhat * c));
          acc[k][e] += g * xhat;
        }
        dxr[i] = out;
      }
    }
  }
  float* pr = partial + static_cast<int64_t>(blockIdx.x) * h;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) pr[i * VEC + e] = acc[k][e];
    }
  }
}

// dweight[j] = sum over the blocks' partial rows, in block order.
template <typename T>
__global__ void rms_reduce_dweight(const float* __restrict__ partial, T* __restrict__ dw,
                                   int blocks, int h) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= h) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += partial[static_cast<int64_t>(b) * h + j];
  dw[j] = from_f<T>(s);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int threads_for(int nvec, int k, int most) {
  int t = (nvec + k - 1) / k;
  t = (t + 31) / 32 * 32;
  return t < 32 ? 32 : (t > most ? most : t);
}

inline int sm_count() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

template <typename T, int VEC>
cudaError_t launch_forward(const void* x, const void* w, void* y, float* rstd, int64_t rows,
                           int h, float eps, cudaStream_t stream) {
  const int threads = threads_for(h / VEC, k_for<VEC>(), kMaxThreads);
  rms_forward<T, VEC><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), rstd, h, eps);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_t(const void* x, const void* w, void* y, float* rstd, int64_t rows, int h,
                      float eps, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (h % V == 0 && aligned16(x) && aligned16(w) && aligned16(y))
    return launch_forward<T, V>(x, w, y, rstd, rows, h, eps, stream);
  return launch_forward<T, 1>(x, w, y, rstd, rows, h, eps, stream);
}

template <typename T, int VEC>
cudaError_t launch_backward(const void* dy, const void* x, const void* w, const float* rstd,
                            void* dx, void* dw, float* partial, int max_blocks, int64_t rows,
                            int h, cudaStream_t stream) {
  const int threads = threads_for(h / VEC, kb_for<VEC>(), kMaxThreadsBackward);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, rms_backward<T, VEC>, threads, 0);
  int64_t blocks = static_cast<int64_t>(sm_count()) * (per_sm > 0 ? per_sm : 1);
  if (blocks > rows) blocks = rows;
  if (blocks > max_blocks) blocks = max_blocks;
  rms_backward<T, VEC><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), rstd,
      static_cast<T*>(dx), partial, rows, h);
  rms_reduce_dweight<T><<<(h + 255) / 256, 256, 0, stream>>>(partial, static_cast<T*>(dw),
                                                              static_cast<int>(blocks), h);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* dy, const void* x, const void* w, const float* rstd, void* dx,
                       void* dw, float* partial, int max_blocks, int64_t rows, int h,
                       cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (h % V == 0 && aligned16(dy) && aligned16(x) && aligned16(w) && aligned16(dx))
    return launch_backward<T, V>(dy, x, w, rstd, dx, dw, partial, max_blocks, rows, h, stream);
  return launch_backward<T, 1>(dy, x, w, rstd, dx, dw, partial, max_blocks, rows, h, stream);
}

const char* message(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

// The launchers the binding calls. dtype: 0 float32, 1 bfloat16, 2 float16. They return null,
// or the CUDA error's text.
const char* apt_rmsnorm_forward(int dtype, const void* x, const void* w, void* y, float* rstd,
                                int64_t rows, int h, float eps, cudaStream_t stream) {
  if (rows == 0) return nullptr;
  switch (dtype) {
    case 0: return message(forward_t<float>(x, w, y, rstd, rows, h, eps, stream));
    case 1: return message(forward_t<__nv_bfloat16>(x, w, y, rstd, rows, h, eps, stream));
    case 2: return message(forward_t<__half>(x, w, y, rstd, rows, h, eps, stream));
    default: return "apt_rmsnorm_forward: unsupported dtype";
  }
}

// The number of fp32 partial rows of dweight the backward may write: the binding allocates
// [apt_rmsnorm_backward_blocks(rows), h] floats and passes the count back as max_blocks.
int apt_rmsnorm_backward_blocks(int64_t rows) {
  const int64_t most = static_cast<int64_t>(sm_count()) * 32;  // resident blocks per SM <= 32
  return static_cast<int>(rows < most ? (rows > 0 ? rows : 1) : most);
}

const char* apt_rmsnorm_backward(int dtype, const void* dy, const void* x, const void* w,
                                 const float* rstd, void* dx, void* dw, float* partial,
                                 int max_blocks, int64_t rows, int h, cudaStream_t stream) {
  if (rows == 0) return nullptr;
  switch (dtype) {
    case 0: return message(backward_t<float>(dy, x, w, rstd, dx, dw, partial, max_blocks, rows, h, stream));
    case 1: return message(backward_t<__nv_bfloat16>(dy, x, w, rstd, dx, dw, partial, max_blocks, rows, h, stream));
    case 2: return message(backward_t<__half>(dy, x, w, rstd, dx, dw, partial, max_blocks, rows, h, stream));
    default: return "apt_rmsnorm_backward: unsupported dtype";
  }
}
