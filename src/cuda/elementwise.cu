// Elementwise kernels. They are memory-bound, so the one thing that matters is moving
// 16 bytes per load/store instruction; the math runs in fp32 whatever the storage type.
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "check.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"

namespace vchat::cuda {

namespace {

// VEC elements moved as one aligned 16-byte (or smaller, for VEC = 1) access.
template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Precise expf, not __expf: this is the reference the bf16 and CPU paths are compared to,
// and the kernel is bandwidth-bound anyway. Large negative x gives exp -> inf, silu -> -0.
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// Grid-stride over packs, then the < VEC leftover elements. No __restrict__: out may
// alias gate or up, which is safe because each element is read before it is written
// by the same thread.
template <class T, int VEC>
__global__ void swiglu_kernel(const T* gate, const T* up, T* out, int64_t n) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / VEC;
  for (int64_t i = first; i < packs; i += step) {
    const Pack<T, VEC> g = reinterpret_cast<const Pack<T, VEC>*>(gate)[i];
    const Pack<T, VEC> u = reinterpret_cast<const Pack<T, VEC>*>(up)[i];
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = T(silu(static_cast<float>(g.v[j])) * static_cast<float>(u.v[j]));
    reinterpret_cast<Pack<T, VEC>*>(out)[i] = o;
  }
  for (int64_t i = packs * VEC + first; i < n; i += step)
    out[i] = T(silu(static_cast<float>(gate[i])) * static_cast<float>(up[i]));
}

// Enough blocks to fill every SM several times over; the grid-stride loop covers the rest,
// so huge tensors do not launch millions of tiny blocks.
int grid_for(int64_t work, int threads) {
  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, bind_device()));
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * 8)));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class T>
void launch_swiglu(const Tensor& gate, const Tensor& up, const Tensor& out) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const auto* g = static_cast<const T*>(gate.raw());
  const auto* u = static_cast<const T*>(up.raw());
  auto* o = static_cast<T*>(out.raw());
  const int64_t n = out.numel();
  // Views with an element offset (slices) can be misaligned; they take the scalar path.
  if (aligned16(g) && aligned16(u) && aligned16(o))
    swiglu_kernel<T, kVec><<<grid_for(n / kVec, kThreads), kThreads>>>(g, u, o, n);
  else
    swiglu_kernel<T, 1><<<grid_for(n, kThreads), kThreads>>>(g, u, o, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out) {
  VCHAT_CHECK(gate.defined() && up.defined() && out.defined(), "cuda::swiglu_fwd needs gate, up and out");
  VCHAT_CHECK(gate.device() == Device::cuda && up.device() == Device::cuda && out.device() == Device::cuda,
              "gate on " << device_name(gate.device()) << ", up on " << device_name(up.device()) << ", out on "
                         << device_name(out.device()) << "; all must be cuda");
  const DType dt = out.dtype();
  VCHAT_CHECK((dt == DType::f32 || dt == DType::bf16) && gate.dtype() == dt && up.dtype() == dt,
              "dtypes " << dtype_name(gate.dtype()) << ", " << dtype_name(up.dtype()) << ", " << dtype_name(dt)
                        << "; need all f32 or all bf16");
  // Same element count rather than same shape, matching the CPU op (callers may pass views).
  VCHAT_CHECK(gate.numel() == out.numel() && up.numel() == out.numel(),
              "gate" << shape_str(gate.shape()) << " up" << shape_str(up.shape()) << " out" << shape_str(out.shape()));
  VCHAT_CHECK(gate.is_contiguous() && up.is_contiguous() && out.is_contiguous(), "contiguous tensors expected");
  if (out.numel() == 0) return;
  if (dt == DType::f32)
    launch_swiglu<float>(gate, up, out);
  else
    launch_swiglu<__nv_bfloat16>(gate, up, out);
}

}  // namespace vchat::cuda
