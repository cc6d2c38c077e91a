// Binding of the CUDA SwiGLU (swiglu_cuda.cu): takes tensors, checks them, and launches on
// the current stream of the tensors' device. Registered as torch ops (apt_swiglu_cuda::*)
// from light headers, for a short build on the GPU machine (see rmsnorm_cpu.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/dtype_code_cuda.h"

#include <limits>

const char* apt_swiglu_forward(int dtype, const void* y, void* out, int64_t rows, int f,
                               cudaStream_t stream);
const char* apt_swiglu_backward(int dtype, const void* g, const void* y, void* dy, int64_t rows,
                                int f, cudaStream_t stream);

namespace {

void check_y(const at::Tensor& y, const char* what) {
  TORCH_CHECK(y.is_cuda(), what, ": a CUDA tensor expected");
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.size(1) % 2 == 0, what,
              ": y must be a contiguous [rows, 2 * f] tensor, got ", y.sizes());
  TORCH_CHECK(y.size(1) / 2 <= std::numeric_limits<int>::max(), what, ": rows too wide");
}

at::Tensor swiglu_forward(const at::Tensor& y) {
  check_y(y, "apt_swiglu_cuda::forward");
  const int code = dtype_code(y, "apt_swiglu_cuda::forward");
  c10::cuda::CUDAGuard guard(y.device());
  const int64_t rows = y.size(0), f = y.size(1) / 2;
  at::Tensor out = at::empty({rows, f}, y.options());
  const char* err = apt_swiglu_forward(code, y.const_data_ptr(), out.mutable_data_ptr(), rows,
                                       static_cast<int>(f),
                                       c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "apt_swiglu_cuda::forward: ", err);
  return out;
}

at::Tensor swiglu_backward(const at::Tensor& g, const at::Tensor& y) {
  check_y(y, "apt_swiglu_cuda::backward");
  const int code = dtype_code(y, "apt_swiglu_cuda::backward");
  const int64_t rows = y.size(0), f = y.size(1) / 2;
  TORCH_CHECK(g.dim() == 2 && g.size(0) == rows && g.size(1) == f && g.is_contiguous() &&
                  g.scalar_type() == y.scalar_type() && g.device() == y.device(),
              "apt_swiglu_cuda::backward: g must be a contiguous [rows, f] tensor typed like y");
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dy = at::empty_like(y);
  const char* err = apt_swiglu_backward(code, g.const_data_ptr(), y.const_data_ptr(),
                                        dy.mutable_data_ptr(), rows, static_cast<int>(f),
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "apt_swiglu_cuda::backward: ", err);
  return dy;
}

}  // namespace

TORCH_LIBRARY(apt_swiglu_cuda, m) {
  m.def("forward(Tensor y) -> Tensor", &swiglu_forward);
  m.def("backward(Tensor g, Tensor y) -> Tensor", &swiglu_backward);
}
