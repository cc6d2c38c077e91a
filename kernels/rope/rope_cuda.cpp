// Binding of the CUDA RoPE (rope_cuda.cu): takes tensors, checks them, and launches on the
// current stream of the tensors' device. Registered as torch ops (apt_rope_cuda::apply) from
// light headers, for a short build on the GPU machine (see rmsnorm_cpu.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

int apt_rope_max_head_dim();
const char* apt_rope_apply(int dtype, const void* t, const float* freqs, float* tables,
                           void* out, int64_t S, int64_t B, int64_t H, int D, int d_rot, int fb,
                           int64_t st_s, int64_t st_b, int64_t st_h, bool interleaved,
                           bool backward, cudaStream_t stream);

namespace {

at::Tensor rope_apply(const at::Tensor& t, const at::Tensor& freqs, bool interleaved,
                      bool backward) {
  TORCH_CHECK(t.is_cuda() && freqs.device() == t.device(),
              "apt_rope_cuda: CUDA tensors on one device expected");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1,
              "apt_rope_cuda: t must be [s, b, h, d] with a contiguous last dimension");
  int code = -1;
  switch (t.scalar_type()) {
    case at::kFloat: code = 0; break;
    case at::kBFloat16: code = 1; break;
    case at::kHalf: code = 2; break;
    default: TORCH_CHECK(false, "apt_rope_cuda: float32, bfloat16 or float16 expected, got ",
                         t.scalar_type());
  }
  const int64_t S = t.size(0), B = t.size(1), H = t.size(2), D = t.size(3);
  TORCH_CHECK(D <= apt_rope_max_head_dim() && S * B * H <= 0xFFFFFFFFll,
              "apt_rope_cuda: head dim at most ", apt_rope_max_head_dim(),
              " and fewer than 2^32 rows expected");
  TORCH_CHECK(freqs.dim() == 4 && freqs.scalar_type() == at::kFloat && freqs.is_contiguous() &&
                  freqs.size(0) == S && (freqs.size(1) == 1 || freqs.size(1) == B) &&
                  freqs.size(2) == 1,
              "apt_rope_cuda: freqs must be contiguous float32 [s, 1 or b, 1, d_rot]");
  const int64_t d_rot = freqs.size(3), fb = freqs.size(1);
  TORCH_CHECK(d_rot % 2 == 0 && d_rot > 0 && d_rot <= D,
              "apt_rope_cuda: d_rot must be even and at most d, got ", d_rot, " for d = ", D);
  c10::cuda::CUDAGuard guard(t.device());
  at::Tensor tables = at::empty({S * fb, 2, d_rot}, freqs.options());
  at::Tensor out = at::empty({S, B, H, D}, t.options());
  const char* err = apt_rope_apply(code, t.const_data_ptr(), freqs.const_data_ptr<float>(),
                                   tables.mutable_data_ptr<float>(), out.mutable_data_ptr(), S,
                                   B, H, static_cast<int>(D), static_cast<int>(d_rot),
                                   static_cast<int>(fb), t.stride(0), t.stride(1), t.stride(2),
                                   interleaved, backward,
                                   c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "apt_rope_cuda: ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY(apt_rope_cuda, m) {
  // backward=True applies the transpose (the gradient of t); freqs gets no gradient.
  m.def("apply(Tensor t, Tensor freqs, bool interleaved, bool backward) -> Tensor", &rope_apply);
}
