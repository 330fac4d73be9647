// Rotary embedding (HF rotate-half), in place: operand checks and the two launches of
// rope_kernels.cuh (the fp32 angle table, then the rotation of every row).
#include "cuda/kernels.cuh"
#include "cuda/rope_kernels.cuh"

namespace vchat::cuda {

void rope_(const Context& c, const Tensor& x, double theta, bool inverse, int64_t position_offset) {
  const char* op = "cuda::rope_";
  const DType dt = expect_compute(op, {{"x", x}});
  VCHAT_CHECK(x.dim() == 4, op << ": x must be [B, L, H, hd], got " << shape_str(x.shape()));
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), hd = x.size(3), half = hd / 2;
  VCHAT_CHECK(hd % 2 == 0, op << ": head dim must be even, got " << hd);
  VCHAT_CHECK(position_offset >= 0, op << ": position offset " << position_offset << " is negative");
  if (x.numel() == 0) return;
  Tensor table = Tensor::empty({L, 2 * half}, DType::f32, Device::cuda);
  launch(c, rope_table, static_cast<unsigned>((L * half + kRopeThreads - 1) / kRopeThreads), kRopeThreads, 0, L, half,
         hd, theta, position_offset, inverse ? -1.f : 1.f, ptr<float>(table));
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, rope_apply<T>, grid_for(B * L * H * half, kRopeThreads), kRopeThreads, 0, ptr<T>(x), ptr<float>(table),
           B * L * H, L, H, half);
  );
  // clang-format on
}

}  // namespace vchat::cuda
