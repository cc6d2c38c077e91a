// Shared by the C++ CPU kernels whose row loops must vectorise: a branch-free exp and one copy
// of each row loop per x86 ISA. Include it after the torch headers: the pragma below applies
// to the rest of the translation unit, which should be this project's code only.
#pragma once

#include <cstdint>
#include <cstring>

// The clamps in fast_exp are compares; under GCC's default -ftrapping-math it will not turn
// them into selects (a compare "may trap"), which leaves "control flow in loop" and no
// vectorisation (checked with -fopt-info-vec). Nothing here reads floating-point exception
// flags, so the code after this header drops that assumption.
#pragma GCC optimize("no-trapping-math")

// Row loops get one copy per ISA, picked at load time (GCC target_clones, an ifunc): the
// build targets x86-64-v2 (SSE4.2) so that one build runs on any CI machine, while eager ATen
// dispatches to AVX2 / AVX-512 at run time; without clones these loops run 2-4x narrower.
// target_clones needs external linkage: put such functions in a named namespace.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define APT_ROW_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define APT_ROW_LOOP
#endif

namespace {

// exp(x) for x <= ~88: 2^k * p(r), r = x - k ln2 in [-ln2/2, ln2/2], Cephes' degree-6
// polynomial (about 1 ulp). Inputs below -87.3 give ~1e-38 instead of a denormal or 0, and
// inputs above 88.3 saturate (near FLT_MAX or at inf): the callers only use it where that
// makes no difference (a sum of exp(logit - max); sigmoid's 1 / (1 + exp(-a)), 0 either way).
// Branch-free (libm's expf does not vectorise without -ffast-math, which would also relax
// every max/sum reduction), so that `omp simd` loops over it vectorise.
#pragma omp declare simd notinbranch
inline float fast_exp(float x) {
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.37626f ? 88.37626f : x;
  // round to nearest by adding and removing 1.5 * 2^23 (std::floor would be a libm call here)
  float k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, k in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace

// bf16 <-> fp32 for a whole row, by bits (per-element conversions mixed into a loop's math do
// not vectorise; these simple loops do): widening is a shift; narrowing rounds to nearest
// even, NaN stays NaN. Defined here, not only declared: each kernel is one translation unit.
namespace apt_simd {

APT_ROW_LOOP void widen_bf16(const uint16_t* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(x[j]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    out[j] = f;
  }
}

APT_ROW_LOOP void narrow_bf16(const float* x, uint16_t* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &x[j], sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    out[j] = static_cast<uint16_t>(x[j] != x[j] ? 0x7fc0u : rounded);
  }
}

}  // namespace apt_simd
