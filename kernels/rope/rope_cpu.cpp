// Fused rotary position embedding for CPU, Megatron's bshd layout and semantics
// (_apply_rotary_pos_emb_bshd): t [s, b, h, d] (any strides but a contiguous last dim, e.g.
// a view from the QKV split), freqs fp32 [s, 1 or b, 1, d_rot]; the first d_rot channels
// are rotated, the rest pass through; the output is a new contiguous [s, b, h, d] tensor.
//
//   out[c] = t[c] * cos(f[c]) + sign(c) * t[p(c)] * sin(f[c])
//
// with the partner channel p(c) = c +- d_rot/2 and sign -1 on the first half (rotate_half),
// or p(c) = c ^ 1 and sign -1 on even channels (interleaved). The backward is the transpose:
//
//   dt[c] = dy[c] * cos(f[c]) - sign(c) * dy[p(c)] * sin(f[p(c)])
//
// (a rotation by -theta when the two channels of a pair share their angle, as Megatron's
// tables do). Both are out[c] = in[c] * C[c] + in[p(c)] * A[c] with per-position tables C, A
// computed once per (s, table row) before the main loop, so the trig is not repeated per head.
// fp32 math for fp32 and bf16 storage; light headers for a short build (see rmsnorm_cpu.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/dtype_cpu.h"

namespace {

// tables [positions, 2, d_rot]: C = cos(f), then A, the coefficient of the partner channel.
void make_tables(const float* freqs, float* tables, int64_t positions, int64_t d_rot,
                 bool interleaved, bool backward) {
  const int64_t half = d_rot / 2;
  at::parallel_for(0, positions, std::max<int64_t>(1, 4096 / d_rot), [&](int64_t b, int64_t e) {
    for (int64_t q = b; q < e; ++q) {
      const float* f = freqs + q * d_rot;
      float* C = tables + q * 2 * d_rot;
      float* A = C + d_rot;
      for (int64_t c = 0; c < d_rot; ++c) {
        const bool first = interleaved ? (c % 2 == 0) : (c < half);
        const float sign = first ? -1.f : 1.f;
        const int64_t p = interleaved ? (c ^ 1) : (first ? c + half : c - half);
        C[c] = std::cos(f[c]);
        A[c] = backward ? -sign * std::sin(f[p]) : sign * std::sin(f[c]);
      }
    }
  });
}

template <typename S>
void rotate(const S* t, const float* tables, S* out, int64_t S_, int64_t B, int64_t H,
            int64_t D, int64_t d_rot, int64_t fb, int64_t st_s, int64_t st_b, int64_t st_h,
            bool interleaved) {
  const int64_t half = d_rot / 2;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H * D, 1));
  at::parallel_for(0, S_ * B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t sb = begin; sb < end; ++sb) {
      const int64_t si = sb / B, bi = sb % B;
      const float* C = tables + (si * fb + (fb == 1 ? 0 : bi)) * 2 * d_rot;
      const float* A = C + d_rot;
      for (int64_t hi = 0; hi < H; ++hi) {
        const S* x = t + si * st_s + bi * st_b + hi * st_h;
        S* o = out + (sb * H + hi) * D;
        if (interleaved) {
#pragma omp simd
          for (int64_t i = 0; i < half; ++i) {
            const float x0 = to_f<S>(x[2 * i]), x1 = to_f<S>(x[2 * i + 1]);
            o[2 * i] = from_f<S>(x0 * C[2 * i] + x1 * A[2 * i]);
            o[2 * i + 1] = from_f<S>(x1 * C[2 * i + 1] + x0 * A[2 * i + 1]);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < half; ++j) {
            const float x0 = to_f<S>(x[j]), x1 = to_f<S>(x[j + half]);
            o[j] = from_f<S>(x0 * C[j] + x1 * A[j]);
            o[j + half] = from_f<S>(x1 * C[j + half] + x0 * A[j + half]);
          }
        }
        for (int64_t c = d_rot; c < D; ++c) o[c] = x[c];
      }
    }
  });
}

at::Tensor rope_apply(const at::Tensor& t, const at::Tensor& freqs, bool interleaved,
                      bool backward) {
  TORCH_CHECK(t.device().is_cpu() && freqs.device().is_cpu(), "apt_rope_cpu: CPU tensors expected");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1,
              "apt_rope_cpu: t must be [s, b, h, d] with a contiguous last dimension");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "apt_rope_cpu: float32 or bfloat16 expected, got ", t.scalar_type());
  const int64_t S_ = t.size(0), B = t.size(1), H = t.size(2), D = t.size(3);
  TORCH_CHECK(freqs.dim() == 4 && freqs.scalar_type() == at::kFloat && freqs.is_contiguous() &&
                  freqs.size(0) == S_ && (freqs.size(1) == 1 || freqs.size(1) == B) &&
                  freqs.size(2) == 1,
              "apt_rope_cpu: freqs must be contiguous float32 [s, 1 or b, 1, d_rot]");
  const int64_t d_rot = freqs.size(3), fb = freqs.size(1);
  TORCH_CHECK(d_rot % 2 == 0 && d_rot > 0 && d_rot <= D,
              "apt_rope_cpu: d_rot must be even and at most d, got ", d_rot, " for d = ", D);
  at::Tensor tables = at::empty({S_ * fb, 2, d_rot}, freqs.options());
  make_tables(freqs.const_data_ptr<float>(), tables.mutable_data_ptr<float>(), S_ * fb, d_rot,
              interleaved, backward);
  at::Tensor out = at::empty({S_, B, H, D}, t.options());
  if (t.scalar_type() == at::kFloat) {
    rotate<float>(t.const_data_ptr<float>(), tables.const_data_ptr<float>(),
                  out.mutable_data_ptr<float>(), S_, B, H, D, d_rot, fb, t.stride(0),
                  t.stride(1), t.stride(2), interleaved);
  } else {
    rotate<uint16_t>(static_cast<const uint16_t*>(t.const_data_ptr()),
                     tables.const_data_ptr<float>(),
                     static_cast<uint16_t*>(out.mutable_data_ptr()), S_, B, H, D, d_rot, fb,
                     t.stride(0), t.stride(1), t.stride(2), interleaved);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(apt_rope_cpu, m) {
  // backward=True applies the transpose (the gradient of t); freqs gets no gradient.
  m.def("apply(Tensor t, Tensor freqs, bool interleaved, bool backward) -> Tensor", &rope_apply);
}
