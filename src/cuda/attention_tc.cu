// Flash attention on tensor cores: the entry points, which check eligibility and launch the
// kernels of attention_tc_kernels.cuh (forward; backward as three passes: delta, dK/dV, dQ).
#include "cuda/attention_tc_kernels.cuh"

#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {
// The kernels' shape limits: bf16, head dim a multiple of the 16-wide MMA, at most 128.
bool tc_shape_ok(DType dtype, int64_t head_dim) {
  return dtype == DType::bf16 && head_dim % 16 == 0 && head_dim >= 16 && head_dim <= 128;
}
// Whether this device grants a block `bytes` of shared memory (its opt-in limit).
bool fits_shared(size_t bytes) {
  int optin = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, bind_device()));
  return bytes <= static_cast<size_t>(optin);
}
}  // namespace

bool attention_fwd_tc_eligible(DType dtype, int64_t head_dim) {
  // ~152 KiB at head dim 128: fits an H100/H200 (227 KiB) and an A100 (163 KiB).
  return tc_shape_ok(dtype, head_dim) && fits_shared(TcLayout(static_cast<int>(head_dim)).total);
}

void attention_fwd_tc(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, const Tensor& out, const Tensor& lse) {
  const TcGeometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 1.f / sqrtf(static_cast<float>(q.size(3)))};
  const size_t smem = TcLayout(static_cast<int>(g.hd)).total;
  allow_dynamic_smem<flash_fwd_tc>(smem, "cuda::attention_fwd (tensor cores)");
  const dim3 grid(static_cast<unsigned>((g.L + kTc - 1) / kTc), static_cast<unsigned>(g.H), static_cast<unsigned>(g.B));
  launch(c, flash_fwd_tc, grid, kTcThreads, smem, mode, g, ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v),
         mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality), ptr<bf16>(out), ptr<float>(lse));
}

bool attention_bwd_tc_eligible(DType dtype, int64_t head_dim) {
  // The dK/dV pass holds four bf16 tiles, two fp32 score tiles and two fp32 accumulators:
  // ~187 KiB at head dim 128, which fits an H100/H200 (227 KiB) but not an A100 (163 KiB).
  return tc_shape_ok(dtype, head_dim) && fits_shared(TcBwdLayout(static_cast<int>(head_dim), kDkvPass).total);
}

void attention_bwd_tc(const Context& c, ops::AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& modality, const Tensor& out, const Tensor& lse, const Tensor& dq,
                      const Tensor& dk, const Tensor& dv) {
  const TcGeometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 1.f / sqrtf(static_cast<float>(q.size(3)))};
  const Tensor delta = Tensor::empty({g.B, g.H, g.L, 2}, DType::f32, Device::cuda);
  const size_t smem_dq = TcBwdLayout(static_cast<int>(g.hd), kDqPass).total;
  const size_t smem = TcBwdLayout(static_cast<int>(g.hd), kDkvPass).total;
  const char* op = "cuda::attention_bwd (tensor cores)";
  allow_dynamic_smem<flash_dq_tc<true>>(smem_dq, op);
  allow_dynamic_smem<flash_dq_tc<false>>(smem_dq, op);
  allow_dynamic_smem<flash_dkv_tc>(smem, op);
  const unsigned tiles = static_cast<unsigned>((g.L + kTc - 1) / kTc);
  const uint8_t* m = mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality);
  launch(c, flash_dq_tc<true>, dim3(tiles, g.H, g.B), kTcThreads, smem_dq, mode, g, ptr<bf16>(q), ptr<bf16>(k),
         ptr<bf16>(v), m, ptr<bf16>(out), ptr<bf16>(dout), ptr<float>(lse), ptr<float>(delta), nullptr);
  launch(c, flash_dkv_tc, dim3(tiles, g.KV, g.B), kTcThreads, smem, mode, g, ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v),
         m, ptr<bf16>(dout), ptr<float>(lse), ptr<float>(delta), ptr<bf16>(dk), ptr<bf16>(dv));
  launch(c, flash_dq_tc<false>, dim3(tiles, g.H, g.B), kTcThreads, smem_dq, mode, g, ptr<bf16>(q), ptr<bf16>(k),
         ptr<bf16>(v), m, ptr<bf16>(out), ptr<bf16>(dout), ptr<float>(lse), ptr<float>(delta), ptr<bf16>(dq));
}

}  // namespace vchat::cuda
