// Rotary embedding (HF rotate-half), in place. Angles are computed once per call in double
// precision and rounded to fp32, as the CPU op does, then applied to every (batch, head).
#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

__global__ void rope_table(int64_t L, int64_t half, int64_t hd, double theta, int64_t offset, float sign,
                           float* table /* [L][2][half] */) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= L * half) return;
  const int64_t l = i / half, k = i % half;
  const double a = static_cast<double>(offset + l) * pow(theta, -2.0 * k / hd);
  table[l * 2 * half + k] = static_cast<float>(cos(a));
  table[l * 2 * half + half + k] = static_cast<float>(sin(a)) * sign;
}

template <class T>
__global__ void rope_apply(T* x, const float* table, int64_t rows /* B*L*H */, int64_t L, int64_t H, int64_t half) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * half; i += step) {
    const int64_t row = i / half, k = i % half, l = (row / H) % L;
    T* v = x + row * 2 * half;
    const float c = table[l * 2 * half + k], s = table[l * 2 * half + half + k];
    const float x1 = ld(v, k), x2 = ld(v, k + half);
    st(v, k, x1 * c - x2 * s);
    st(v, k + half, x2 * c + x1 * s);
  }
}

}  // namespace

void rope_(const Context& c, const Tensor& x, double theta, bool inverse, int64_t position_offset) {
  const char* op = "cuda::rope_";
  const DType dt = expect_compute(op, {{"x", x}});
  VCHAT_CHECK(x.dim() == 4, op << ": x must be [B, L, H, hd], got " << shape_str(x.shape()));
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), hd = x.size(3), half = hd / 2;
  VCHAT_CHECK(hd % 2 == 0, op << ": head dim must be even, got " << hd);
  VCHAT_CHECK(position_offset >= 0, op << ": position offset " << position_offset << " is negative");
  if (x.numel() == 0) return;
  Tensor table = Tensor::empty({L, 2 * half}, DType::f32, Device::cuda);
  rope_table<<<static_cast<unsigned>((L * half + 255) / 256), 256, 0, stream_of(c)>>>(
      L, half, hd, theta, position_offset, inverse ? -1.f : 1.f, ptr<float>(table));
  CUDA_CHECK_LAUNCH();
  VCHAT_DISPATCH(dt, T,
    rope_apply<<<grid_for(B * L * H * half, 256), 256, 0, stream_of(c)>>>(ptr<T>(x), ptr<float>(table), B * L * H, L,
                                                                          H, half);
  );
  CUDA_CHECK_LAUNCH();
}

}  // namespace vchat::cuda
