// Binding of the CUDA RMSNorm (rmsnorm_cuda.cu): takes tensors, checks them, and launches on
// the current stream of the tensors' device. Registered as torch ops (apt_rmsnorm_cuda::*)
// from light headers, for a short build on the GPU machine (see rmsnorm_cpu.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/dtype_code_cuda.h"

#include <tuple>

const char* apt_rmsnorm_forward(int dtype, const void* x, const void* w, void* y, float* rstd,
                                int64_t rows, int h, float eps, cudaStream_t stream);
int apt_rmsnorm_backward_blocks(int64_t rows);
const char* apt_rmsnorm_backward(int dtype, const void* dy, const void* x, const void* w,
                                 const float* rstd, void* dx, void* dw, float* partial,
                                 int max_blocks, int64_t rows, int h, cudaStream_t stream);

namespace {

// Rows of up to this many elements fit the kernels' registers (rmsnorm.py: CUDA_MAX_HIDDEN).
constexpr int64_t kMaxHidden = 16384;

void check_inputs(const at::Tensor& x, const at::Tensor& w, const char* what) {
  TORCH_CHECK(x.is_cuda() && w.device() == x.device(), what, ": CUDA tensors on one device expected");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), what, ": x must be a contiguous [rows, h] tensor");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1), what,
              ": weight must be a contiguous [h] tensor, h = ", x.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), what, ": x and weight must share a dtype");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) <= kMaxHidden, what, ": h must be in 1..", kMaxHidden,
              ", got ", x.size(1));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& w,
                                                    double eps) {
  check_inputs(x, w, "apt_rmsnorm_cuda::forward");
  const int code = dtype_code(x, "apt_rmsnorm_cuda::forward");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  const char* err = apt_rmsnorm_forward(code, x.const_data_ptr(), w.const_data_ptr(),
                                        y.mutable_data_ptr(), rstd.mutable_data_ptr<float>(),
                                        rows, static_cast<int>(x.size(1)),
                                        static_cast<float>(eps),
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "apt_rmsnorm_cuda::forward: ", err);
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& w,
                                                     const at::Tensor& rstd) {
  check_inputs(x, w, "apt_rmsnorm_cuda::backward");
  const int code = dtype_code(x, "apt_rmsnorm_cuda::backward");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() &&
                  dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "apt_rmsnorm_cuda::backward: dy must be contiguous, shaped and typed like x");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == x.size(0) &&
                  rstd.scalar_type() == at::kFloat && rstd.is_contiguous() &&
                  rstd.device() == x.device(),
              "apt_rmsnorm_cuda::backward: rstd must be float32 [rows]");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), h = x.size(1);
  const int blocks = apt_rmsnorm_backward_blocks(rows);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty_like(w);
  at::Tensor partial = at::empty({blocks, h}, x.options().dtype(at::kFloat));
  const char* err = apt_rmsnorm_backward(
      code, dy.const_data_ptr(), x.const_data_ptr(), w.const_data_ptr(),
      rstd.const_data_ptr<float>(), dx.mutable_data_ptr(), dw.mutable_data_ptr(),
      partial.mutable_data_ptr<float>(), blocks, rows, static_cast<int>(h),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "apt_rmsnorm_cuda::backward: ", err);
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY(apt_rmsnorm_cuda, m) {
  m.def("forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)", &rms_norm_forward);
  m.def("backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)",
        &rms_norm_backward);
}
