// Host tensors for kernels run under tests/emu/cuda_emu.h (include that first): operands in
// the kernel's storage type and poisoned outputs (test::expect_close compares them with the
// CPU op, as the GPU suite does); and the emulator's recorded problems as test failures.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tensor.h"
#include "../test_util.h"

namespace vchat::emu {

// f32 values drawn uniformly from [lo, hi) and rounded to what storage `dt` holds, so that
// the CPU op and the kernel see the same numbers.
inline Tensor rand_values(const Shape& s, DType dt, std::mt19937& rng, float lo, float hi) {
  Tensor t = Tensor::empty(s);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float x = d(rng);
    t.data<float>()[i] = dt == DType::bf16 ? test::bf16_value(test::bf16_bits(x)) : x;
  }
  return t;
}
// The f32 host tensor h stored as `dt` (f32: a copy; bf16: rounded to nearest even).
inline Tensor as_storage(const Tensor& h, DType dt) {
  if (dt == DType::f32) return h.clone();
  Tensor t = Tensor::empty(h.shape(), DType::bf16);
  for (int64_t i = 0; i < h.numel(); ++i) t.data<uint16_t>()[i] = test::bf16_bits(h.data<float>()[i]);
  return t;
}
// An output of storage `dt` filled with NaN: an element the kernel never writes shows.
inline Tensor poisoned(const Shape& s, DType dt) {
  Tensor t = Tensor::empty(s, dt);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (dt == DType::bf16)
      t.data<uint16_t>()[i] = 0x7fc0;
    else
      t.data<float>()[i] = NAN;
  }
  return t;
}
// Each problem the emulator recorded (errors()) as a test failure; then clears them.
inline void expect_no_errors() {
  for (const std::string& e : errors()) ADD_FAILURE() << e;
  errors().clear();
}
// The tensor's memory as the kernel's pointer type T (float or cuda::bf16).
template <class T>
T* kp(const Tensor& t) {
  return reinterpret_cast<T*>(t.raw());
}

}  // namespace vchat::emu
