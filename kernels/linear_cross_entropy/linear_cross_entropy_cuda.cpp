// Binding of the CUDA row kernels (linear_cross_entropy_cuda.cu) to torch: checks the tensors,
// takes the current stream and calls the raw-pointer launchers. Same functions, names and
// semantics as the CPU kernel (linear_cross_entropy_cpu.cpp), so the Python side
// (apt/kernels/linear_cross_entropy.py: the block walk and its cuBLAS matmuls) is one code path.
// Builds and runs only where a CUDA torch is installed (the lent GPU); CI compiles the .cu alone.
// Registered as torch ops (apt_linear_cross_entropy_cuda::*) from light headers, for a short
// build on the GPU machine (see linear_cross_entropy_cpu.cpp).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/dtype_code_cuda.h"

#include <cstdint>

cudaError_t lce_stats_cuda(const void* logits, int dtype, int64_t rows, int64_t cols,
                           const int64_t* labels, int64_t vocab_start, float* m, float* s,
                           float* t, cudaStream_t stream);
cudaError_t lce_softmax_grad_cuda(void* logits, int dtype, int64_t rows, int64_t cols,
                                  const int64_t* labels, int64_t vocab_start, const float* lse,
                                  const float* grad, cudaStream_t stream);

namespace {

void check_block(const at::Tensor& logits, const at::Tensor& labels, const char* what) {
  TORCH_CHECK(logits.is_cuda() && labels.device() == logits.device(),
              what, ": CUDA kernel needs logits and labels on one CUDA device");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              what, ": logits must be a contiguous [rows, cols] block");
  TORCH_CHECK(logits.size(0) <= INT32_MAX, what, ": at most 2^31 - 1 rows per block");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0) &&
                  labels.scalar_type() == at::kLong && labels.is_contiguous(),
              what, ": labels must be contiguous int64 [rows]");
}

void check_rows(const at::Tensor& v, const at::Tensor& logits, const char* what,
                const char* name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == logits.size(0) && v.scalar_type() == at::kFloat &&
                  v.is_contiguous() && v.device() == logits.device(),
              what, ": ", name, " must be contiguous fp32 [", logits.size(0),
              "] on the logits' device");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void stats_(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
            const at::Tensor& m, const at::Tensor& s, const at::Tensor& t) {
  const char* what = "linear_cross_entropy stats_";
  check_block(logits, labels, what);
  check_rows(m, logits, what, "m");
  check_rows(s, logits, what, "s");
  check_rows(t, logits, what, "t");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(lce_stats_cuda(logits.const_data_ptr(), dtype_code(logits, what),
                              logits.size(0), logits.size(1),
                              labels.const_data_ptr<int64_t>(), vocab_start,
                              m.data_ptr<float>(), s.data_ptr<float>(), t.data_ptr<float>(),
                              c10::cuda::getCurrentCUDAStream().stream()),
               what);
}

void softmax_grad_(const at::Tensor& logits, const at::Tensor& labels, int64_t vocab_start,
                   const at::Tensor& lse, const at::Tensor& grad) {
  const char* what = "linear_cross_entropy softmax_grad_";
  check_block(logits, labels, what);
  check_rows(lse, logits, what, "lse");
  check_rows(grad, logits, what, "grad");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(lce_softmax_grad_cuda(logits.data_ptr(), dtype_code(logits, what),
                                     logits.size(0), logits.size(1),
                                     labels.const_data_ptr<int64_t>(), vocab_start,
                                     lse.const_data_ptr<float>(), grad.const_data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
               what);
}

TORCH_LIBRARY(apt_linear_cross_entropy_cuda, module) {
  module.def("stats_(Tensor logits, Tensor labels, int vocab_start, Tensor(a!) m, "
             "Tensor(b!) s, Tensor(c!) t) -> ()", &stats_);
  module.def("softmax_grad_(Tensor(a!) logits, Tensor labels, int vocab_start, Tensor lse, "
             "Tensor grad) -> ()", &softmax_grad_);
}
