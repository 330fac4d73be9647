// Values for the Comm tests under mpirun (tests/mpi_comm_main.cpp, the MPI backend;
// tests/mpi_nccl_emulated_main.cpp, the NCCL backend on the emulated device): each dtype's
// host values as doubles, inputs distinct per rank and index, and the reduction over ranks
// each backend must produce, with how far a bf16 sum may round.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel/comm.h"
#include "../test_util.h"  // bf16_bits, bf16_value

namespace vchat::comm_test {

// ---- host values of each dtype, as doubles ----

inline void store(DType t, void* base, int64_t i, double v) {
  switch (t) {
    case DType::f32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case DType::bf16:
      static_cast<uint16_t*>(base)[i] = test::bf16_bits(static_cast<float>(v));
      break;
    case DType::i32:
      static_cast<int32_t*>(base)[i] = static_cast<int32_t>(v);
      break;
    case DType::u8:
      static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(v);
      break;
  }
}
inline double load(DType t, const void* base, int64_t i) {
  switch (t) {
    case DType::f32:
      return static_cast<const float*>(base)[i];
    case DType::bf16:
      return test::bf16_value(static_cast<const uint16_t*>(base)[i]);
    case DType::i32:
      return static_cast<const int32_t*>(base)[i];
    case DType::u8:
      return static_cast<const uint8_t*>(base)[i];
  }
  return 0;
}
inline double representable(DType t, double v) {  // v as stored in t
  uint8_t tmp[4];
  store(t, tmp, 0, v);
  return load(t, tmp, 0);
}

// Distinct per rank and index. f32 and i32 sums are exact (small multiples of 1/4 and small
// integers); bf16 values are not representable, so sums exercise rounding.
inline double value(DType t, int rank, int64_t i) {
  switch (t) {
    case DType::f32:
      return 0.25 * ((i * 7 + rank * 13) % 41) - 5.0;
    case DType::bf16:
      return 1.37 * (rank + 1) + 0.011 * (i % 97) - 2.0 * (i % 3);
    case DType::i32:
      return static_cast<double>((i * 5 + rank * 11) % 23) - 9 * rank;
    case DType::u8:
      return static_cast<double>((i * 3 + rank * 29) % 256);
  }
  return 0;
}

inline std::vector<uint8_t> buffer(DType t, int64_t count) { return std::vector<uint8_t>(count * dtype_size(t)); }

// The expected reduction over ranks of inputs(q), and how far the backend may be from it:
// exact except bf16 sums, where each of the n-1 additions rounds to bf16 (≤ 2^-9 of the
// running magnitude, bounded by Σ|x|; 2^-8 leaves room for the final rounding).
struct Expected {
  double value, tolerance;
};
template <class Input>
inline Expected reduce_over_ranks(DType t, ReduceOp op, int n, Input input) {
  double acc = op == ReduceOp::sum ? 0.0 : -INFINITY, abs_sum = 0;
  for (int q = 0; q < n; ++q) {
    const double x = representable(t, input(q));
    acc = op == ReduceOp::sum ? acc + x : std::max(acc, x);
    abs_sum += std::fabs(x);
  }
  const bool rounds = t == DType::bf16 && op == ReduceOp::sum;
  return {acc, rounds ? std::ldexp(abs_sum, -8) * (n - 1) : 0.0};
}

inline const char* op_name(ReduceOp op) { return op == ReduceOp::sum ? "sum" : "max"; }
inline constexpr DType kReduceTypes[] = {DType::f32, DType::bf16, DType::i32};
inline constexpr ReduceOp kOps[] = {ReduceOp::sum, ReduceOp::max};

// Every rank must end with the same bytes (data-parallel replicas must not drift apart).
inline void expect_same_on_all_ranks(Comm& c, const std::vector<uint8_t>& bytes) {
  std::vector<uint8_t> all(bytes.size() * c.size());
  c.all_gather(bytes.data(), all.data(), static_cast<int64_t>(bytes.size()), DType::u8);
  for (int q = 0; q < c.size(); ++q)
    EXPECT_EQ(0, std::memcmp(all.data() + q * bytes.size(), bytes.data(), bytes.size())) << "rank " << q << " differs";
}

}  // namespace vchat::comm_test
