// Row kernels of the fused linear + cross-entropy (apt/kernels/linear_cross_entropy.py), CPU.
//
// The Python side computes one block of logits at a time (hidden rows x a slice of the
// vocabulary, one ATen matmul into a reused buffer) and hands it here:
//   stats_          folds the block into per-row running (max, sum of exp, target logit): the
//                   online logsumexp, so no [tokens, vocab] tensor ever exists;
//   softmax_grad_   turns a recomputed block IN PLACE into (softmax - onehot) * grad_out, the
//                   gradient of the logits, which the caller then multiplies into dW and dh.
// Math is fp32 whatever the logits' dtype (bf16/fp16 rows are widened into a per-thread
// buffer). Rows run in parallel (at::parallel_for); the per-element loops are `omp simd`
// loops over fp32 with an exp written in plain arithmetic, so they vectorise, one copy per ISA
// (common/simd_cpu.h).
//
// Registered as torch ops (TORCH_LIBRARY apt_linear_cross_entropy_cpu, reached as
// torch.ops.apt_linear_cross_entropy_cpu.*) from light headers: torch/extension.h would
// take about 5x the compile time (CI builds each kernel once per run).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/simd_cpu.h"

namespace apt_lce {

APT_ROW_LOOP float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

APT_ROW_LOOP float row_sum_exp(const float* x, int64_t n, float shift) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += fast_exp(x[j] - shift);
  return s;
}

// x <- exp(x - lse) * g, in place.
APT_ROW_LOOP void row_scaled_softmax(float* x, int64_t n, float lse, float g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = fast_exp(x[j] - lse) * g;
}

}  // namespace apt_lce

namespace {
using apt_lce::row_max;
using apt_lce::row_scaled_softmax;
using apt_lce::row_sum_exp;

void widen(const c10::BFloat16* x, float* out, int64_t n) {
  apt_simd::widen_bf16(reinterpret_cast<const uint16_t*>(x), out, n);
}
void widen(const c10::Half* x, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(x[j]);
}
void narrow(const float* x, c10::BFloat16* out, int64_t n) {
  apt_simd::narrow_bf16(x, reinterpret_cast<uint16_t*>(out), n);
}
void narrow(const float* x, c10::Half* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<c10::Half>(x[j]);
}

// The block's rows as fp32: fp32 blocks are used where they are; others are widened into buf.
template <typename scalar_t>
const float* as_float(const scalar_t* x, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    buf.resize(n);
    widen(x, buf.data(), n);
    return buf.data();
  }
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

template <typename scalar_t>
void stats_impl(const scalar_t* logits, int64_t rows, int64_t cols, const int64_t* labels,
                int64_t vocab_start, float* m, float* s, float* t) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = as_float(logits + r * cols, cols, buf);
      const float block_max = row_max(x, cols);
      const float new_max = std::max(m[r], block_max);
      const float sum = row_sum_exp(x, cols, new_max);
      // the running sum was relative to the old max; m = -inf (no block yet) gives 0 * 0
      s[r] = (m[r] == new_max ? s[r] : s[r] * std::exp(m[r] - new_max)) + sum;
      m[r] = new_max;
      const int64_t local = labels[r] - vocab_start;
      if (local >= 0 && local < cols) t[r] += x[local];
    }
  });
}

template <typename scalar_t>
void softmax_grad_impl(scalar_t* logits, int64_t rows, int64_t cols, const int64_t* labels,
                       int64_t vocab_start, const float* lse, const float* grad) {
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = logits + r * cols;
      const int64_t local = labels[r] - vocab_start;
      const bool has_target = local >= 0 && local < cols;
      const float g = grad[r];
      if constexpr (std::is_same_v<scalar_t, float>) {
        const float target = has_target ? row[local] : 0.f;
        row_scaled_softmax(row, cols, lse[r], g);
        // (p - 1) * g as Megatron computes it, from the logit read before the loop
        if (has_target) row[local] = (fast_exp(target - lse[r]) - 1.f) * g;
      } else {
        buf.resize(cols);
        widen(row, buf.data(), cols);
        const float target = has_target ? buf[local] : 0.f;
        row_scaled_softmax(buf.data(), cols, lse[r], g);
        if (has_target) buf[local] = (fast_exp(target - lse[r]) - 1.f) * g;
        narrow(buf.data(), row, cols);
      }
    }
  });
}

void check_block(const at::Tensor& logits, const at::Tensor& labels, const char* what) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(),
              what, ": CPU kernel given a tensor on ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              what, ": logits must be a contiguous [rows, cols] block");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) &&
                  labels.scalar_type() == at::kLong && labels.is_contiguous(),
              what, ": labels must be contiguous int64 [rows]");
}

void check_rows(const at::Tensor& v, int64_t rows, const char* what, const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == rows && v.scalar_type() == at::kFloat &&
                  v.is_contiguous() && v.device().is_cpu(),
              what, ": ", name, " must be contiguous fp32 [", rows, "]");
}

// float32 / bfloat16 / float16 only: fp64 callers take the eager path (it is the reference).
template <typename F>
void dispatch(at::ScalarType type, const char* what, F&& body) {
  switch (type) {
    case at::kFloat: body(float{}); break;
    case at::kBFloat16: body(c10::BFloat16{}); break;
    case at::kHalf: body(c10::Half{}); break;
    default: TORCH_CHECK(false, what, ": logits must be float32, bfloat16 or float16, not ", type);
  }
}

}  // namespace

// Fold a logits block [rows, cols] (vocabulary ids vocab_start ... vocab_start + cols - 1) into
// the running per-row max m, sum s of exp(logit - m) and target logit t, all in place.
void stats_(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
            const at::Tensor& m, const at::Tensor& s, const at::Tensor& t) {
  check_block(logits, labels, "linear_cross_entropy stats_");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  check_rows(m, rows, "linear_cross_entropy stats_", "m");
  check_rows(s, rows, "linear_cross_entropy stats_", "s");
  check_rows(t, rows, "linear_cross_entropy stats_", "t");
  dispatch(logits.scalar_type(), "linear_cross_entropy stats_", [&](auto tag) {
    using scalar_t = decltype(tag);
    stats_impl<scalar_t>(logits.const_data_ptr<scalar_t>(), rows, cols,
                         labels.const_data_ptr<int64_t>(), vocab_start, m.data_ptr<float>(),
                         s.data_ptr<float>(), t.data_ptr<float>());
  });
}

// Turn a recomputed logits block into (softmax - onehot(label)) * grad in place, softmax taken
// with the global logsumexp lse [rows].
void softmax_grad_(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
                   const at::Tensor& lse, const at::Tensor& grad) {
  check_block(logits, labels, "linear_cross_entropy softmax_grad_");
  const int64_t rows = logits.size(0), cols = logits.size(1);
  check_rows(lse, rows, "linear_cross_entropy softmax_grad_", "lse");
  check_rows(grad, rows, "linear_cross_entropy softmax_grad_", "grad");
  dispatch(logits.scalar_type(), "linear_cross_entropy softmax_grad_", [&](auto tag) {
    using scalar_t = decltype(tag);
    softmax_grad_impl<scalar_t>(logits.data_ptr<scalar_t>(), rows, cols,
                                labels.const_data_ptr<int64_t>(), vocab_start,
                                lse.const_data_ptr<float>(), grad.const_data_ptr<float>());
  });
}

// The schemas mark what each op writes in place (m, s, t; the logits block).
TORCH_LIBRARY(apt_linear_cross_entropy_cpu, module) {
  module.def("stats_(Tensor logits, Tensor labels, int vocab_start, Tensor(a!) m, "
             "Tensor(b!) s, Tensor(c!) t) -> ()", &stats_);
  module.def("softmax_grad_(Tensor(a!) logits, Tensor labels, int vocab_start, Tensor lse, "
             "Tensor grad) -> ()", &softmax_grad_);
}
