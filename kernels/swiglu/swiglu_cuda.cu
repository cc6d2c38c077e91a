// Fused SwiGLU for CUDA, forward and backward: out = silu(a) * b for y = [a | b] (halves of
// each row), dy = [g * b * s * (1 + a * (1 - s)) | g * a * s] with s = sigmoid(a). No torch
// headers (raw pointers and the caller's stream, as rmsnorm_cuda.cu); the binding
// swiglu_cuda.cpp checks the tensors and calls the launchers at the bottom.
//
// Memory bound: each element is read once and written once, in 16-byte vectors (VEC
// elements) where the half-row width and the pointers allow, else one element at a time.
// Blocks stride over rows (row = blockIdx.x + k * gridDim.x), threads over a row's vectors.
// fp32 math for float / bfloat16 / half.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype_cuda.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 32;   // plenty of blocks to fill any GPU

__device__ __forceinline__ float sigmoid(float a) { return 1.f / (1.f + __expf(-a)); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
swiglu_forward(const T* __restrict__ y, T* __restrict__ out, int64_t rows, int f) {
  using P = Pack<T, VEC>;
  const int nvec = f / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const P* a = reinterpret_cast<const P*>(y + row * 2 * f);
    const P* b = reinterpret_cast<const P*>(y + row * 2 * f + f);
    P* o = reinterpret_cast<P*>(out + row * f);
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const P av = a[i], bv = b[i];
      P ov;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float x = to_f<T>(av.v[k]);
        ov.v[k] = from_f<T>(x * sigmoid(x) * to_f<T>(bv.v[k]));
      }
      o[i] = ov;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
swiglu_backward(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ dy,
                int64_t rows, int f) {
  using P = Pack<T, VEC>;
  const int nvec = f / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const P* a = reinterpret_cast<const P*>(y + row * 2 * f);
    const P* b = reinterpret_cast<const P*>(y + row * 2 * f + f);
    const P* gr = reinterpret_cast<const P*>(g + row * f);
    P* da = reinterpret_cast<P*>(dy + row * 2 * f);
    P* db = reinterpret_cast<P*>(dy + row * 2 * f + f);
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const P av = a[i], bv = b[i], gv = gr[i];
      P dav, dbv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float x = to_f<T>(av.v[k]), gg = to_f<T>(gv.v[k]);
        const float s = sigmoid(x);
        dav.v[k] = from_f<T>(gg * to_f<T>(bv.v[k]) * s * (1.f + x * (1.f - s)));
        dbv.v[k] = from_f<T>(gg * x * s);
      }
      da[i] = dav;
      db[i] = dbv;
    }
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline unsigned blocks_for(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxBlocks ? rows : kMaxBlocks);
}

// The vectorised kernels need every row's halves 16-byte aligned: f a multiple of VEC and
// 16-byte aligned base pointers.
template <typename T>
cudaError_t forward_t(const void* y, void* out, int64_t rows, int f, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (f % V == 0 && aligned16(y) && aligned16(out))
    swiglu_forward<T, V><<<blocks_for(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(y), static_cast<T*>(out), rows, f);
  else
    swiglu_forward<T, 1><<<blocks_for(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(y), static_cast<T*>(out), rows, f);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* g, const void* y, void* dy, int64_t rows, int f,
                       cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (f % V == 0 && aligned16(g) && aligned16(y) && aligned16(dy))
    swiglu_backward<T, V><<<blocks_for(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(y), static_cast<T*>(dy), rows, f);
  else
    swiglu_backward<T, 1><<<blocks_for(rows), kThreads, 0, stream>>>(
        static_cast<const T*>(g), static_cast<const T*>(y), static_cast<T*>(dy), rows, f);
  return cudaGetLastError();
}

const char* message(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

}  // namespace

// The launchers the binding calls. dtype: 0 float32, 1 bfloat16, 2 float16; f: half the row
// width. They return null, or the CUDA error's text.
const char* apt_swiglu_forward(int dtype, const void* y, void* out, int64_t rows, int f,
                               cudaStream_t stream) {
  if (rows == 0 || f == 0) return nullptr;
  switch (dtype) {
    case 0: return message(forward_t<float>(y, out, rows, f, stream));
    case 1: return message(forward_t<__nv_bfloat16>(y, out, rows, f, stream));
    case 2: return message(forward_t<__half>(y, out, rows, f, stream));
    default: return "apt_swiglu_forward: unsupported dtype";
  }
}

const char* apt_swiglu_backward(int dtype, const void* g, const void* y, void* dy, int64_t rows,
                                int f, cudaStream_t stream) {
  if (rows == 0 || f == 0) return nullptr;
  switch (dtype) {
    case 0: return message(backward_t<float>(g, y, dy, rows, f, stream));
    case 1: return message(backward_t<__nv_bfloat16>(g, y, dy, rows, f, stream));
    case 2: return message(backward_t<__half>(g, y, dy, rows, f, stream));
    default: return "apt_swiglu_backward: unsupported dtype";
  }
}
