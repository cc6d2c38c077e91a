// Shared by the C++ CPU kernels: bf16 travels as its raw 16 bits so that the conversions are
// integer ops the compiler vectorises inside `omp simd` loops; rounding is to nearest even (as
// c10), NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace {

template <typename S> inline float to_f(S v);
template <> inline float to_f<float>(float v) { return v; }
template <> inline float to_f<uint16_t>(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename S> inline S from_f(float f);
template <> inline float from_f<float>(float f) { return f; }
template <> inline uint16_t from_f<uint16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

}  // namespace
