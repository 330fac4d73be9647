// Flash attention on CUDA cores (fp32 math, f32 or bf16 storage): the entry points, which
// check the operands, pick the tensor-core kernels where they apply (attention_tc.cu), and
// launch the kernels of attention_kernels.cuh (forward; backward as delta, dK/dV, dQ).
#include "cuda/attention_kernels.cuh"

#include <atomic>
#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

Geometry check_attention(const char* op, AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                         const Tensor& modality) {
  VCHAT_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              op << ": q, k, v must be [B, L, heads, hd]: q" << shape_str(q.shape()) << " k" << shape_str(k.shape())
                 << " v" << shape_str(v.shape()));
  Geometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 0.f};
  VCHAT_CHECK(k.shape() == v.shape() && k.size(0) == g.B && k.size(1) == g.L && k.size(3) == g.hd,
              op << ": q" << shape_str(q.shape()) << " k" << shape_str(k.shape()) << " v" << shape_str(v.shape()));
  VCHAT_CHECK(g.KV > 0 && g.H % g.KV == 0, op << ": " << g.H << " query heads over " << g.KV << " KV heads");
  VCHAT_CHECK(g.hd > 0 && g.hd <= kMaxHd, op << ": head dim " << g.hd << " (at most " << kMaxHd << ")");
  if (mode != AttnMode::full) {
    expect(op, {"modality", modality}, {DType::u8});
    VCHAT_CHECK(modality.shape() == Shape({g.B, g.L}),
                op << ": modality " << shape_str(modality.shape()) << ", expected [" << g.B << ", " << g.L << "]");
  }
  g.scale = 1.f / sqrtf(static_cast<float>(g.hd));
  return g;
}

std::atomic<AttentionKernel> g_kernel{AttentionKernel::automatic};
std::atomic<AttentionBackward> g_backward{AttentionBackward::deterministic};

}  // namespace

void set_attention_kernel(AttentionKernel k) { g_kernel.store(k); }
void set_attention_backward(AttentionBackward b) { g_backward.store(b); }

void attention_fwd(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& modality, const Tensor& out, const Tensor& lse) {
  const char* op = "cuda::attention_fwd";
  const DType dt = expect_compute(op, {{"q", q}, {"k", k}, {"v", v}, {"out", out}});
  const Geometry g = check_attention(op, mode, q, k, v, modality);
  VCHAT_CHECK(out.shape() == q.shape(), op << ": out " << shape_str(out.shape()) << " for q " << shape_str(q.shape()));
  expect_f32(op, {{"lse", lse}});
  VCHAT_CHECK(lse.shape() == Shape({g.B, g.H, g.L, 2}), op << ": lse " << shape_str(lse.shape()));
  if (q.numel() == 0) return;
  const AttentionKernel want = g_kernel.load();
  const bool registers = want != AttentionKernel::wmma && attention_tc_registers_ok({&q, &k, &v});
  if (want != AttentionKernel::cuda_cores && attention_fwd_tc_eligible(dt, g.hd, registers))
    return attention_fwd_tc(c, mode, q, k, v, modality, out, lse, registers);
  VCHAT_CHECK(want != AttentionKernel::tensor_cores,
              op << ": the tensor-core kernels need bf16, a head dim that is a multiple of 16 up to 128, and "
                    "the shared memory of an A100 or H100 at head dim 128 (got "
                 << dtype_name(dt) << ", " << g.hd << ")");
  const dim3 grid(static_cast<unsigned>((g.L + kTile - 1) / kTile), static_cast<unsigned>(g.H),
                  static_cast<unsigned>(g.B));
  const size_t smem = FlashSmem(g.hd).fwd;
  const uint8_t* m = mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality);
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    allow_dynamic_smem<flash_fwd<T>>(smem, op);
    launch(c, flash_fwd<T>, grid, kThreads, smem, mode, g, ptr<T>(q), ptr<T>(k), ptr<T>(v), m, ptr<T>(out),
           ptr<float>(lse));
  );
  // clang-format on
}

void attention_bwd(const Context& c, ops::AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& modality, const Tensor& out, const Tensor& lse, const Tensor& dq,
                   const Tensor& dk, const Tensor& dv) {
  const char* op = "cuda::attention_bwd";
  const DType dt = expect_compute(
      op, {{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"dout", dout}, {"dq", dq}, {"dk", dk}, {"dv", dv}});
  const Geometry g = check_attention(op, mode, q, k, v, modality);
  for (const Arg& a : {Arg{"out", out}, Arg{"dout", dout}, Arg{"dq", dq}})
    VCHAT_CHECK(a.t.shape() == q.shape(), op << ": " << a.name << " " << shape_str(a.t.shape()) << " for q "
                                             << shape_str(q.shape()));
  VCHAT_CHECK(dk.shape() == k.shape() && dv.shape() == v.shape(), op << ": dk/dv shapes must match k/v");
  expect_f32(op, {{"lse", lse}});
  VCHAT_CHECK(lse.shape() == Shape({g.B, g.H, g.L, 2}), op << ": lse " << shape_str(lse.shape()));
  if (q.numel() == 0) return;
  const AttentionKernel want = g_kernel.load();
  const bool registers = want != AttentionKernel::wmma && attention_tc_registers_ok({&q, &k, &v, &dout});
  const bool atomic_dq = registers && g_backward.load() == AttentionBackward::atomic_dq;
  if (want != AttentionKernel::cuda_cores && attention_bwd_tc_eligible(dt, g.hd, registers, atomic_dq))
    return attention_bwd_tc(c, mode, dout, q, k, v, modality, out, lse, dq, dk, dv, registers, atomic_dq);
  VCHAT_CHECK(want != AttentionKernel::tensor_cores,
              op << ": the tensor-core kernels need bf16, a head dim that is a multiple of 16 up to 128, and the "
                    "shared memory of an A100 or H100 at head dim 128 (the WMMA kernels: an H100/H200) (got "
                 << dtype_name(dt) << ", " << g.hd << ")");
  const Tensor delta = Tensor::empty({g.B, g.H, g.L, 2}, DType::f32, Device::cuda);
  const unsigned tiles = static_cast<unsigned>((g.L + kTile - 1) / kTile);
  const uint8_t* m = mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality);
  const FlashSmem smem(g.hd);
  const size_t s_delta = smem.delta, s_dkv = smem.dkv, s_dq = smem.dq;
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    allow_dynamic_smem<flash_delta<T>>(s_delta, op);
    allow_dynamic_smem<flash_dkv<T>>(s_dkv, op);
    allow_dynamic_smem<flash_dq<T>>(s_dq, op);
    launch(c, flash_delta<T>, dim3(tiles, g.H, g.B), kThreads, s_delta, mode, g, ptr<T>(q), ptr<T>(k), ptr<T>(v), m,
           ptr<T>(out), ptr<T>(dout), ptr<float>(lse), ptr<float>(delta));
    launch(c, flash_dkv<T>, dim3(tiles, g.KV, g.B), kThreads, s_dkv, mode, g, ptr<T>(q), ptr<T>(k), ptr<T>(v), m,
           ptr<T>(dout), ptr<float>(lse), ptr<float>(delta), ptr<T>(dk), ptr<T>(dv));
    launch(c, flash_dq<T>, dim3(tiles, g.H, g.B), kThreads, s_dq, mode, g, ptr<T>(q), ptr<T>(k), ptr<T>(v), m,
           ptr<T>(dout), ptr<float>(lse), ptr<float>(delta), ptr<T>(dq));
  );
  // clang-format on
}

}  // namespace vchat::cuda
