// Flash attention on tensor cores: the entry points, which check eligibility and launch the
// kernels of attention_mma_kernels.cuh (tiles in registers) or of attention_tc_kernels.cuh
// (WMMA): a forward, and the backward as three passes (delta, dK/dV, dQ), or for the register
// kernels optionally two (delta, then dK/dV with dQ by atomic adds; cuda_backend.h).
#include "cuda/attention_mma_kernels.cuh"
#include "cuda/attention_tc_kernels.cuh"

#include <algorithm>
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

// The register-tile forward for head dim HD.
template <int HD>
void launch_fwd_mma(const Context& c, AttnMode mode, const MmaGeometry& g, const Tensor& q, const Tensor& k,
                    const Tensor& v, const uint8_t* modality, const Tensor& out, const Tensor& lse) {
  const char* op = "cuda::attention_fwd (tensor cores, registers)";
  const size_t smem = MmaLayout<HD>::total;
  const dim3 grid(static_cast<unsigned>((g.L + kMmaRows - 1) / kMmaRows), static_cast<unsigned>(g.H),
                  static_cast<unsigned>(g.B));
  const auto kernel = mode == AttnMode::mmca ? flash_fwd_mma<HD, true> : flash_fwd_mma<HD, false>;
  allow_dynamic_smem<flash_fwd_mma<HD, true>>(smem, op);
  allow_dynamic_smem<flash_fwd_mma<HD, false>>(smem, op);
  launch(c, kernel, grid, kMmaThreads, smem, mode, g, ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), modality,
         ptr<bf16>(out), ptr<float>(lse));
}

// The register-tile backward for head dim HD: delta, dK/dV, dQ; or, atomic_dq, delta, then
// dK/dV adding dQ's shares into an fp32 buffer, then that buffer scaled and rounded into dq.
template <int HD>
void launch_bwd_mma(const Context& c, AttnMode mode, const MmaGeometry& g, const Tensor& q, const Tensor& k,
                    const Tensor& v, const uint8_t* m, const Tensor& out, const Tensor& dout, const Tensor& lse,
                    const Tensor& delta, const Tensor& dq, const Tensor& dk, const Tensor& dv, bool atomic_dq) {
  const char* op = "cuda::attention_bwd (tensor cores, registers)";
  const size_t smem = MmaBwdLayout<HD>::total, smem_atomic = MmaBwdLayout<HD>::total_atomic_dq;
  allow_dynamic_smem<flash_dq_mma<HD, true>>(smem, op);
  allow_dynamic_smem<flash_dq_mma<HD, false>>(smem, op);
  allow_dynamic_smem<flash_dkv_mma<HD, false>>(smem, op);
  // (Asked only when it runs: its eligibility was checked against the larger layout.)
  if (atomic_dq) allow_dynamic_smem<flash_dkv_mma<HD, true>>(smem_atomic, op);
  const unsigned tiles = static_cast<unsigned>((g.L + kMmaRows - 1) / kMmaRows);  // blocks of 128 queries or keys
  const unsigned H = static_cast<unsigned>(g.H), KV = static_cast<unsigned>(g.KV), B = static_cast<unsigned>(g.B);
  launch(c, flash_dq_mma<HD, true>, dim3(tiles, H, B), kMmaThreads, smem, mode, g, ptr<bf16>(q), ptr<bf16>(k),
         ptr<bf16>(v), m, ptr<bf16>(out), ptr<bf16>(dout), ptr<float>(lse), ptr<float>(delta), nullptr);
  if (atomic_dq) {
    const Tensor acc = Tensor::zeros(q.shape(), DType::f32, Device::cuda);  // dQ unscaled, [B, L, H, HD]
    launch(c, flash_dkv_mma<HD, true>, dim3(tiles, KV, B), kMmaThreads, smem_atomic, mode, g, ptr<bf16>(q),
           ptr<bf16>(k), ptr<bf16>(v), m, ptr<bf16>(dout), ptr<float>(lse), ptr<float>(delta), ptr<bf16>(dk),
           ptr<bf16>(dv), ptr<float>(acc));
    const int64_t n = acc.numel();
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n / 2 + 255) / 256, 65536));
    launch(c, flash_dq_finish, dim3(blocks), 256, 0, ptr<float>(acc), ptr<bf16>(dq), n, g.scale);
    return;
  }
  launch(c, flash_dkv_mma<HD, false>, dim3(tiles, KV, B), kMmaThreads, smem, mode, g, ptr<bf16>(q), ptr<bf16>(k),
         ptr<bf16>(v), m, ptr<bf16>(dout), ptr<float>(lse), ptr<float>(delta), ptr<bf16>(dk), ptr<bf16>(dv), nullptr);
  launch(c, flash_dq_mma<HD, false>, dim3(tiles, H, B), kMmaThreads, smem, mode, g, ptr<bf16>(q), ptr<bf16>(k),
         ptr<bf16>(v), m, ptr<bf16>(out), ptr<bf16>(dout), ptr<float>(lse), ptr<float>(delta), ptr<bf16>(dq));
}

}  // namespace

bool attention_tc_registers_ok(std::initializer_list<const Tensor*> operands) {
  for (const Tensor* t : operands)
    if (reinterpret_cast<uintptr_t>(t->raw()) % 16 != 0) return false;
  return true;
}

bool attention_fwd_tc_eligible(DType dtype, int64_t head_dim, bool registers) {
  // At head dim 128: registers ~102 KiB, WMMA ~152 KiB; both fit an H100/H200 (227 KiB)
  // and an A100 (163 KiB).
  if (!tc_shape_ok(dtype, head_dim)) return false;
  const size_t smem = registers ? with_head_dim(head_dim, [](auto hd) { return MmaLayout<decltype(hd)::value>::total; })
                                : TcLayout(static_cast<int>(head_dim)).total;
  return fits_shared(smem);
}

void attention_fwd_tc(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, const Tensor& out, const Tensor& lse, bool registers) {
  const TcGeometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 1.f / sqrtf(static_cast<float>(q.size(3)))};
  if (registers) {
    VCHAT_CHECK(attention_tc_registers_ok({&q, &k, &v}), "cuda::attention_fwd: q, k, v must start 16-byte aligned");
    const MmaGeometry mg{g.B, g.L, g.H, g.KV, g.scale, 1.4426950408889634f * g.scale};
    const uint8_t* m = mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality);
    return with_head_dim(g.hd,
                         [&](auto hd) { launch_fwd_mma<decltype(hd)::value>(c, mode, mg, q, k, v, m, out, lse); });
  }
  const size_t smem = TcLayout(static_cast<int>(g.hd)).total;
  allow_dynamic_smem<flash_fwd_tc>(smem, "cuda::attention_fwd (tensor cores)");
  const dim3 grid(static_cast<unsigned>((g.L + kTc - 1) / kTc), static_cast<unsigned>(g.H), static_cast<unsigned>(g.B));
  launch(c, flash_fwd_tc, grid, kTcThreads, smem, mode, g, ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v),
         mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality), ptr<bf16>(out), ptr<float>(lse));
}

bool attention_bwd_tc_eligible(DType dtype, int64_t head_dim, bool registers, bool atomic_dq) {
  // At head dim 128: registers ~138 KiB (~158 KiB with the atomic dQ's dSᵀ buffers), which
  // fits an H100/H200 (227 KiB) and an A100 (163 KiB); WMMA's dK/dV pass (four bf16 tiles,
  // two fp32 score tiles and two fp32 accumulators) ~187 KiB, which fits an H100/H200 but
  // not an A100.
  if (!tc_shape_ok(dtype, head_dim)) return false;
  const size_t smem = registers ? with_head_dim(head_dim,
                                                [&](auto hd) {
                                                  using Lay = MmaBwdLayout<decltype(hd)::value>;
                                                  return atomic_dq ? Lay::total_atomic_dq : Lay::total;
                                                })
                                : TcBwdLayout(static_cast<int>(head_dim), kDkvPass).total;
  return fits_shared(smem);
}

void attention_bwd_tc(const Context& c, ops::AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& modality, const Tensor& out, const Tensor& lse, const Tensor& dq,
                      const Tensor& dk, const Tensor& dv, bool registers, bool atomic_dq) {
  const TcGeometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 1.f / sqrtf(static_cast<float>(q.size(3)))};
  const Tensor delta = Tensor::empty({g.B, g.H, g.L, 2}, DType::f32, Device::cuda);
  if (registers) {
    VCHAT_CHECK(attention_tc_registers_ok({&q, &k, &v, &dout}),
                "cuda::attention_bwd: q, k, v, dout must start 16-byte aligned");
    const MmaGeometry mg{g.B, g.L, g.H, g.KV, g.scale, 1.4426950408889634f * g.scale};
    const uint8_t* m = mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality);
    return with_head_dim(g.hd, [&](auto hd) {
      launch_bwd_mma<decltype(hd)::value>(c, mode, mg, q, k, v, m, out, dout, lse, delta, dq, dk, dv, atomic_dq);
    });
  }
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
