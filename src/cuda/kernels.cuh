// What the kernel files share: launch geometry, the context's stream, block reductions,
// and the operand checks every entry point starts with (device_storage.cuh: fp32 math over
// f32/bf16 storage).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>

#include "check.h"
#include "cuda/context.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/device_reduce.cuh"
#include "cuda/device_storage.cuh"
#include "cuda/grid_stride.cuh"

namespace vchat::cuda {

inline cudaStream_t stream_of(const Context& c) { return static_cast<cudaStream_t>(c.stream()); }

// Grants `Kernel` the dynamic shared memory a launch of it needs beyond the default 48 KiB:
// the size asked for (not a worst case the device may not have), once per increase (the
// grant is per kernel, process-wide). A size beyond this GPU's opt-in limit is refused
// naming `who` and both sizes, instead of a failed launch.
template <auto Kernel>
void allow_dynamic_smem(size_t bytes, const char* who) {
  static std::atomic<size_t> granted{size_t{48} << 10};
  if (bytes <= granted.load()) return;
  int optin = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, bind_device()));
  VCHAT_CHECK(bytes <= static_cast<size_t>(optin),
              who << ": needs " << bytes << " bytes of shared memory per block; this GPU grants " << optin);
  CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  granted.store(bytes);
}

// Enough blocks to fill every SM several times; grid-stride loops cover the rest.
inline int grid_for(int64_t work, int threads) {
  static thread_local int sms = 0;
  if (!sms) CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, bind_device()));
  const int64_t needed = (work + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * 8)));
}

// kernel<<<grid, block, smem, c's stream>>>(args...), then the launch checked: every kernel
// of src/cuda/ starts here, so that the same entry points also run on the CPU emulator
// (tests/emu/sdk/: a block's threads as fibers, host memory as device memory), where
// the kernel and a copy of its arguments wait in the stream's queue, as on a GPU.
template <class... Params, class... Args>
void launch(const Context& c, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args... args) {
#ifdef VCHAT_CUDA_EMULATION
  emu::launch_kernel(
      reinterpret_cast<const void*>(kernel), grid, block, smem, stream_of(c), [kernel, args...] { kernel(args...); },
      args...);
#else
  // (clang-format would split the launch's >>>)
  // clang-format off
  kernel<<<grid, block, smem, stream_of(c)>>>(args...);
  // clang-format on
#endif
  CUDA_CHECK_LAUNCH();
  c.count_launch();
}

// f(i) for i in [0, n), one element per thread, grid-stride: the elementwise and row kernels.
template <class F>
void launch_each(const Context& c, int64_t n, F f) {
  if (n == 0) return;
  launch(c, each_kernel<F>, grid_for(n, 256), 256, 0, n, f);
}

template <class F>
void column_sums(const Context& c, int64_t rows, int64_t cols, float* out, F value) {
  if (rows == 0 || cols == 0) return;
  const int64_t chunks = (rows + kColRows - 1) / kColRows;
  Tensor partial = Tensor::empty({chunks, cols}, DType::f32, Device::cuda);  // freed stream-ordered
  VCHAT_CHECK((cols + 31) / 32 <= 65535, "column sums over " << cols << " columns: at most 65535 x 32");
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>((cols + 31) / 32));
  launch(c, colsum_partial<F>, grid, dim3(32, 8), 0, value, rows, cols, static_cast<float*>(partial.raw()));
  launch(c, colsum_finish<>, static_cast<unsigned>((cols + 255) / 256), 256, 0,
         static_cast<const float*>(partial.raw()), chunks, cols, out);
}

// Operand checks: every entry point names the op and the operand that is wrong.
struct Arg {
  const char* name;
  const Tensor& t;
};
// Defined, on cuda, contiguous, of one of `dtypes`.
inline void expect(const char* op, const Arg& a, std::initializer_list<DType> dtypes) {
  VCHAT_CHECK(a.t.defined(), op << ": operand " << a.name << " is missing");
  VCHAT_CHECK(a.t.device() == Device::cuda, op << ": operand " << a.name << " is on " << device_name(a.t.device())
                                               << ", expected cuda");
  bool ok = false;
  for (DType d : dtypes) ok = ok || a.t.dtype() == d;
  VCHAT_CHECK(ok, op << ": operand " << a.name << " is " << dtype_name(a.t.dtype()) << ", not an allowed dtype");
  VCHAT_CHECK(a.t.is_contiguous(), op << ": operand " << a.name << " " << shape_str(a.t.shape()) << " is not contiguous");
}
// The compute dtype of an op: all of `args` share the first one's, f32 or bf16.
inline DType expect_compute(const char* op, std::initializer_list<Arg> args) {
  const DType dt = args.begin()->t.dtype();
  for (const Arg& a : args) {
    expect(op, a, {DType::f32, DType::bf16});
    VCHAT_CHECK(a.t.dtype() == dt, op << ": operand " << a.name << " is " << dtype_name(a.t.dtype()) << " but "
                                      << args.begin()->name << " is " << dtype_name(dt));
  }
  return dt;
}
inline void expect_f32(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args) expect(op, a, {DType::f32});
}

// Runs the statements with T = float or bf16 after the compute dtype. A macro, not a generic
// lambda, so that the statements are the entry point's own (its locals, nested dispatch).
#define VCHAT_DISPATCH(dtype, T, ...)           \
  do {                                          \
    if ((dtype) == ::vchat::DType::f32) {       \
      using T = float;                          \
      __VA_ARGS__                               \
    } else {                                    \
      using T = ::vchat::cuda::bf16;            \
      __VA_ARGS__                               \
    }                                           \
  } while (0)

template <class T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.raw());
}

}  // namespace vchat::cuda
