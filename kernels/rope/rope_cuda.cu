// Fused rotary position embedding for CUDA, forward and backward, Megatron's bshd layout (see
// rope_cpu.cpp for the formulas). No torch headers: raw pointers and the caller's stream; the
// binding rope_cuda.cpp checks the tensors and calls apt_rope_apply.
//
// Two kernels: a small one turns the fp32 angle table [s * fb, d_rot] into the coefficient
// tables C (cos) and A (the partner channel's signed sin), in double precision because the
// build uses --use_fast_math, whose sinf/cosf lose accuracy at the large angles of late
// positions; then the main kernel, one thread per 16-byte vector of a [s, b, h] row
// (threadIdx.x over the row, threadIdx.y over rows, no 64-bit division), computes
// out[c] = in[c] * C[c] + in[p(c)] * A[c] in fp32 and writes a contiguous output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dtype_cuda.cuh"

namespace {

// tables [positions, 2, d_rot]: C = cos(f), A = sign * sin(f) (forward) or
// -sign * sin(f[partner]) (backward, the transpose).
__global__ void rope_tables(const float* __restrict__ freqs, float* __restrict__ tables,
                            int64_t positions, int d_rot, bool interleaved, bool backward) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= positions * d_rot) return;
  const int64_t q = idx / d_rot;
  const int c = static_cast<int>(idx - q * d_rot), half = d_rot / 2;
  const bool first = interleaved ? (c % 2 == 0) : (c < half);
  const int p = interleaved ? (c ^ 1) : (first ? c + half : c - half);
  const float sign = first ? -1.f : 1.f;
  const float* f = freqs + q * d_rot;
  float* C = tables + q * 2 * d_rot;
  C[c] = static_cast<float>(cos(static_cast<double>(f[c])));
  C[d_rot + c] = backward ? -sign * static_cast<float>(sin(static_cast<double>(f[p])))
                          : sign * static_cast<float>(sin(static_cast<double>(f[c])));
}

template <typename T, int VEC, bool INTERLEAVED>
__global__ void __launch_bounds__(1024)
rope_rotate(const T* __restrict__ t, const float* __restrict__ tables, T* __restrict__ out,
            uint32_t rows, uint32_t B, uint32_t H, int D, int d_rot, int fb, int64_t st_s,
            int64_t st_b, int64_t st_h) {
  using P = Pack<T, VEC>;
  const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
  const int c0 = threadIdx.x * VEC;
  if (row >= rows || c0 >= D) return;
  const uint32_t hi = row % H, sb = row / H, bi = sb % B, si = sb / B;
  const T* x = t + si * st_s + bi * st_b + hi * st_h;
  const P xv = *reinterpret_cast<const P*>(x + c0);
  P* o = reinterpret_cast<P*>(out + static_cast<int64_t>(row) * D + c0);
  if (c0 >= d_rot) {  // pass-through channels (VEC divides d_rot: no vector straddles)
    *o = xv;
    return;
  }
  const float* C = tables + (static_cast<int64_t>(si) * fb + (fb == 1 ? 0 : bi)) * 2 * d_rot;
  const float* A = C + d_rot;
  P pv;
  if (INTERLEAVED && VEC >= 2) {  // pairs (2i, 2i+1) lie inside the vector
#pragma unroll
    for (int e = 0; e < VEC; ++e) pv.v[e] = xv.v[e ^ 1];
  } else {
    const int half = d_rot / 2;
    const int pc = INTERLEAVED ? (c0 ^ 1) : (c0 < half ? c0 + half : c0 - half);
    pv = *reinterpret_cast<const P*>(x + pc);
  }
  float cv[VEC], av[VEC];
  if (VEC % 4 == 0) {  // 16-byte table loads: rows of the tables are 8 * d_rot bytes apart
#pragma unroll
    for (int e = 0; e < VEC; e += 4) {
      *reinterpret_cast<float4*>(cv + e) = *reinterpret_cast<const float4*>(C + c0 + e);
      *reinterpret_cast<float4*>(av + e) = *reinterpret_cast<const float4*>(A + c0 + e);
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      cv[e] = C[c0 + e];
      av[e] = A[c0 + e];
    }
  }
  P res;
#pragma unroll
  for (int e = 0; e < VEC; ++e) res.v[e] = from_f<T>(to_f(xv.v[e]) * cv[e] + to_f(pv.v[e]) * av[e]);
  *o = res;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T, int VEC, bool INTERLEAVED>
cudaError_t launch_rotate(const void* t, const float* tables, void* out, uint32_t rows,
                          uint32_t B, uint32_t H, int D, int d_rot, int fb, int64_t st_s,
                          int64_t st_b, int64_t st_h, cudaStream_t stream) {
  const int dv = D / VEC;
  const int per_block = dv >= 256 ? 1 : 256 / dv;
  const dim3 block(dv, per_block);
  const unsigned grid = (rows + per_block - 1) / per_block;
  rope_rotate<T, VEC, INTERLEAVED><<<grid, block, 0, stream>>>(
      static_cast<const T*>(t), tables, static_cast<T*>(out), rows, B, H, D, d_rot, fb, st_s,
      st_b, st_h);
  return cudaGetLastError();
}

template <typename T, bool INTERLEAVED>
cudaError_t rotate_t(const void* t, const float* tables, void* out, uint32_t rows, uint32_t B,
                     uint32_t H, int D, int d_rot, int fb, int64_t st_s, int64_t st_b,
                     int64_t st_h, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  // Vectors must not straddle the rotated / pass-through boundary, nor (rotate_half) the
  // two halves, and every row must start 16-byte aligned.
  const bool vec = D % V == 0 && d_rot % V == 0 && (INTERLEAVED || (d_rot / 2) % V == 0) &&
                   st_s % V == 0 && st_b % V == 0 && st_h % V == 0 && aligned16(t) &&
                   aligned16(out) && D / V <= 256;
  if (vec)
    return launch_rotate<T, V, INTERLEAVED>(t, tables, out, rows, B, H, D, d_rot, fb, st_s,
                                            st_b, st_h, stream);
  return launch_rotate<T, 1, INTERLEAVED>(t, tables, out, rows, B, H, D, d_rot, fb, st_s, st_b,
                                          st_h, stream);
}

template <typename T>
cudaError_t apply_t(const void* t, const float* tables, void* out, uint32_t rows, uint32_t B,
                    uint32_t H, int D, int d_rot, int fb, int64_t st_s, int64_t st_b,
                    int64_t st_h, bool interleaved, cudaStream_t stream) {
  return interleaved
             ? rotate_t<T, true>(t, tables, out, rows, B, H, D, d_rot, fb, st_s, st_b, st_h, stream)
             : rotate_t<T, false>(t, tables, out, rows, B, H, D, d_rot, fb, st_s, st_b, st_h, stream);
}

}  // namespace

// The head dimension the kernel takes (one thread per element when it cannot vectorise).
int apt_rope_max_head_dim() { return 1024; }

// out = the rotation (backward: its transpose) of t [s, b, h, d] (element strides st_*; unit
// stride over d) by freqs [s, fb, 1, d_rot]; tables is scratch of s * fb * 2 * d_rot floats.
// dtype: 0 float32, 1 bfloat16, 2 float16. Returns null, or the CUDA error's text.
const char* apt_rope_apply(int dtype, const void* t, const float* freqs, float* tables,
                           void* out, int64_t S, int64_t B, int64_t H, int D, int d_rot, int fb,
                           int64_t st_s, int64_t st_b, int64_t st_h, bool interleaved,
                           bool backward, cudaStream_t stream) {
  const int64_t rows = S * B * H;
  if (rows == 0) return nullptr;
  if (rows > 0xFFFFFFFFll || D > apt_rope_max_head_dim()) return "apt_rope_apply: shape too large";
  const int64_t positions = S * fb;
  const int64_t n = positions * d_rot;
  rope_tables<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      freqs, tables, positions, d_rot, interleaved, backward);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const uint32_t r = static_cast<uint32_t>(rows), b = static_cast<uint32_t>(B),
                 h = static_cast<uint32_t>(H);
  switch (dtype) {
    case 0: err = apply_t<float>(t, tables, out, r, b, h, D, d_rot, fb, st_s, st_b, st_h, interleaved, stream); break;
    case 1: err = apply_t<__nv_bfloat16>(t, tables, out, r, b, h, D, d_rot, fb, st_s, st_b, st_h, interleaved, stream); break;
    case 2: err = apply_t<__half>(t, tables, out, r, b, h, D, d_rot, fb, st_s, st_b, st_h, interleaved, stream); break;
    default: return "apt_rope_apply: unsupported dtype";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
