// Fused SwiGLU for CPU: out = silu(a) * b for y = [a | b] split in halves along the last
// dimension (Megatron's gated fc1 output, [gate | up] on each TP rank), and its backward
// dy = [g * b * s * (1 + a * (1 - s)) | g * a * s] with s = sigmoid(a), fp32 math for fp32
// and bf16 storage.
//
// WHY: eager SwiGLU is a chunk, a silu and a multiply (Megatron's GLU also adds its 0.0
// linear offset) and, in backward, multiplies, silu_backward and the cat that glues the two
// halves' gradients back together: about nine passes over [tokens, 2 * ffn], each with a
// temporary. Here it is one pass each way, writing dy straight into its [tokens, 2 * ffn]
// layout (no cat), with a vectorising exp and one copy of the row loops per ISA
// (common/simd_cpu.h).
//
// Light headers and TORCH_LIBRARY (namespace apt_swiglu_cpu), as rmsnorm_cpu.cpp explains.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/simd_cpu.h"

namespace apt_swiglu {

// bf16 rows are widened to fp32 a chunk at a time into stack buffers, run through the fp32
// loops and narrowed back (common/simd_cpu.h): simple loops vectorise where one loop mixing
// the bit conversions with the math did not (measured: that one was slower than eager bf16).
constexpr int64_t kChunk = 256;
using apt_simd::narrow_bf16;
using apt_simd::widen_bf16;

APT_ROW_LOOP void forward_f32(const float* a, const float* b, float* o, int64_t f) {
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) o[j] = a[j] / (1.f + fast_exp(-a[j])) * b[j];
}

APT_ROW_LOOP void backward_f32(const float* g, const float* a, const float* b, float* da,
                               float* db, int64_t f) {
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) {
    const float s = 1.f / (1.f + fast_exp(-a[j]));
    da[j] = g[j] * b[j] * s * (1.f + a[j] * (1.f - s));
    db[j] = g[j] * a[j] * s;
  }
}

void forward_bf16(const uint16_t* a, const uint16_t* b, uint16_t* o, int64_t f) {
  float af[kChunk], bf[kChunk], of[kChunk];
  for (int64_t j = 0; j < f; j += kChunk) {
    const int64_t n = std::min(kChunk, f - j);
    widen_bf16(a + j, af, n);
    widen_bf16(b + j, bf, n);
    forward_f32(af, bf, of, n);
    narrow_bf16(of, o + j, n);
  }
}

void backward_bf16(const uint16_t* g, const uint16_t* a, const uint16_t* b, uint16_t* da,
                   uint16_t* db, int64_t f) {
  float gf[kChunk], af[kChunk], bf[kChunk], daf[kChunk], dbf[kChunk];
  for (int64_t j = 0; j < f; j += kChunk) {
    const int64_t n = std::min(kChunk, f - j);
    widen_bf16(g + j, gf, n);
    widen_bf16(a + j, af, n);
    widen_bf16(b + j, bf, n);
    backward_f32(gf, af, bf, daf, dbf, n);
    narrow_bf16(daf, da + j, n);
    narrow_bf16(dbf, db + j, n);
  }
}

inline void forward_row(const float* a, const float* b, float* o, int64_t f) {
  forward_f32(a, b, o, f);
}
inline void forward_row(const uint16_t* a, const uint16_t* b, uint16_t* o, int64_t f) {
  forward_bf16(a, b, o, f);
}
inline void backward_row(const float* g, const float* a, const float* b, float* da, float* db,
                         int64_t f) {
  backward_f32(g, a, b, da, db, f);
}
inline void backward_row(const uint16_t* g, const uint16_t* a, const uint16_t* b,
                         uint16_t* da, uint16_t* db, int64_t f) {
  backward_bf16(g, a, b, da, db, f);
}

}  // namespace apt_swiglu

namespace {

// Rows per parallel task: about 32k elements, so small rows do not pay one task each.
inline int64_t row_grain(int64_t f) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(f, 1)); }

void check_y(const at::Tensor& y, const char* what) {
  TORCH_CHECK(y.device().is_cpu(), what, ": CPU tensors expected");
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.size(1) % 2 == 0, what,
              ": y must be a contiguous [rows, 2 * f] tensor, got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16, what,
              ": float32 or bfloat16 expected, got ", y.scalar_type());
}

// run(S{}) with S the storage type: float, or uint16_t for bf16's bits.
template <typename F>
void dispatch(const at::Tensor& t, F&& run) {
  if (t.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(uint16_t{});
  }
}

at::Tensor swiglu_forward(const at::Tensor& y) {
  check_y(y, "apt_swiglu_cpu::forward");
  const int64_t rows = y.size(0), f = y.size(1) / 2;
  at::Tensor out = at::empty({rows, f}, y.options());
  dispatch(y, [&](auto tag) {
    using S = decltype(tag);
    const S* yp = static_cast<const S*>(y.const_data_ptr());
    S* op = static_cast<S*>(out.mutable_data_ptr());
    at::parallel_for(0, rows, row_grain(f), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        apt_swiglu::forward_row(yp + r * 2 * f, yp + r * 2 * f + f, op + r * f, f);
    });
  });
  return out;
}

at::Tensor swiglu_backward(const at::Tensor& g, const at::Tensor& y) {
  check_y(y, "apt_swiglu_cpu::backward");
  const int64_t rows = y.size(0), f = y.size(1) / 2;
  TORCH_CHECK(g.dim() == 2 && g.size(0) == rows && g.size(1) == f && g.is_contiguous() &&
                  g.scalar_type() == y.scalar_type() && g.device().is_cpu(),
              "apt_swiglu_cpu::backward: g must be a contiguous [rows, f] tensor typed like y");
  at::Tensor dy = at::empty_like(y);
  dispatch(y, [&](auto tag) {
    using S = decltype(tag);
    const S* gp = static_cast<const S*>(g.const_data_ptr());
    const S* yp = static_cast<const S*>(y.const_data_ptr());
    S* dp = static_cast<S*>(dy.mutable_data_ptr());
    at::parallel_for(0, rows, row_grain(f), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        apt_swiglu::backward_row(gp + r * f, yp + r * 2 * f, yp + r * 2 * f + f,
                                 dp + r * 2 * f, dp + r * 2 * f + f, f);
    });
  });
  return dy;
}

}  // namespace

TORCH_LIBRARY(apt_swiglu_cpu, m) {
  m.def("forward(Tensor y) -> Tensor", &swiglu_forward);
  m.def("backward(Tensor g, Tensor y) -> Tensor", &swiglu_backward);
}
