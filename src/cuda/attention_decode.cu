// Attention for generation (the chat KV cache): the entry point, which checks the operands
// and launches the kernel of attention_decode_kernels.cuh, one block per (query, head).
#include "cuda/attention_decode_kernels.cuh"

#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

void attention_decode(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, int64_t position, const Tensor& out) {
  const char* op = "cuda::attention_decode";
  const DType dt = expect_compute(op, {{"q", q}, {"k", k}, {"v", v}, {"out", out}});
  VCHAT_CHECK(q.dim() == 3 && k.dim() == 3 && k.shape() == v.shape(),
              op << ": q [n, H, hd], k/v [Lk, KV, hd] expected; q " << shape_str(q.shape()) << " k "
                 << shape_str(k.shape()) << " v " << shape_str(v.shape()));
  DecodeGeometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(0), position, 0.f};
  VCHAT_CHECK(k.size(2) == g.hd && g.KV > 0 && g.H % g.KV == 0,
              op << ": " << g.H << " heads over " << g.KV << " kv heads, head dim " << g.hd << " vs " << k.size(2));
  VCHAT_CHECK(g.hd <= kDecodeMaxHd, op << ": head dim " << g.hd << " above " << kDecodeMaxHd);
  VCHAT_CHECK(position >= 0 && position + g.n == g.Lk,
              op << ": queries at " << position << ".." << position + g.n << " over " << g.Lk << " keys");
  VCHAT_CHECK(out.shape() == q.shape(), op << ": out " << shape_str(out.shape()) << " for q " << shape_str(q.shape()));
  if (mode != AttnMode::full) {
    expect(op, {"modality", modality}, {DType::u8});
    VCHAT_CHECK(modality.shape() == Shape({g.Lk}), op << ": modality " << shape_str(modality.shape()) << ", expected ["
                                                      << g.Lk << "]");
  }
  if (q.numel() == 0) return;
  g.scale = 1.f / std::sqrt(static_cast<float>(g.hd));
  const uint8_t* m = mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality);
  const dim3 grid(static_cast<unsigned>(g.n), static_cast<unsigned>(g.H));
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, decode_kernel<T>, grid, kDecodeWarps * 32, 0, mode, g, ptr<T>(q), ptr<T>(k), ptr<T>(v), m, ptr<T>(out));
  );
  // clang-format on
}

}  // namespace vchat::cuda
