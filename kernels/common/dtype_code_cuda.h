// Shared by the CUDA kernels' bindings: the dtype code their launchers take (the .cu files
// have no torch headers, so no ScalarType): 0 float32, 1 bfloat16, 2 float16.
#pragma once

#include <ATen/core/Tensor.h>

namespace {

inline int dtype_code(const at::Tensor& x, const char* what) {
  switch (x.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, what, ": float32, bfloat16 or float16 expected, got ", x.scalar_type());
  }
  return -1;
}

}  // namespace
