// Row movement: embedding lookup and its deterministic backward, scatter/gather of image
// rows, ViT patch extraction and embeddings: operand checks and launches. The per-element
// bodies are the functors of rows_kernels.cuh, run by kernels.cuh's launch_each.
#include "cuda/kernels.cuh"
#include "cuda/rows_kernels.cuh"

namespace vchat::cuda {

namespace {

void expect_index(const char* op, const char* name, const Tensor& t) { expect(op, {name, t}, {DType::i32}); }

}  // namespace

// clang-format off
void embedding_fwd(const Context& c, const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_begin) {
  const char* op = "cuda::embedding_fwd";
  const DType dt = expect_compute(op, {{"table", table}, {"out", out}});
  expect_index(op, "ids", ids);
  const int64_t n = ids.numel(), V = table.size(0), D = table.size(1);
  VCHAT_CHECK(out.numel() == n * D, op << ": out " << shape_str(out.shape()) << " for " << n << " ids of width " << D);
  VCHAT_DISPATCH(dt, T,
    launch_each(c, n * D, EmbeddingFwdEach<T>{ptr<int32_t>(ids), ptr<T>(table), ptr<T>(out), V, D, vocab_begin});
  );
}

void embedding_bwd(const Context& c, const Tensor& dout, const ops::TokenGroups& g, const Tensor& dtable,
                   int64_t vocab_begin) {
  const char* op = "cuda::embedding_bwd";
  expect(op, {"dout", dout}, {DType::f32, DType::bf16});
  expect_f32(op, {{"dtable", dtable}});
  for (const Arg& a : {Arg{"groups.order", g.order}, Arg{"groups.offsets", g.offsets}, Arg{"groups.ids", g.ids}})
    expect_index(op, a.name, a.t);
  const int64_t groups = g.ids.numel(), V = dtable.size(0), D = dtable.size(1);
  VCHAT_CHECK(g.offsets.numel() == groups + 1, op << ": " << groups << " groups need " << groups + 1 << " offsets, got "
                                                  << g.offsets.numel());
  VCHAT_CHECK(dout.size(-1) == D, op << ": dout " << shape_str(dout.shape()) << " for a table of width " << D);
  VCHAT_DISPATCH(dout.dtype(), T,
    launch_each(c, groups * D, EmbeddingBwdEach<T>{ptr<T>(dout), ptr<int32_t>(g.order), ptr<int32_t>(g.offsets),
                                                  ptr<int32_t>(g.ids), ptr<float>(dtable), V, D, vocab_begin});
  );
}

void scatter_rows(const Context& c, const Tensor& src, const Tensor& index, const Tensor& dst) {
  const char* op = "cuda::scatter_rows";
  const DType dt = expect_compute(op, {{"src", src}, {"dst", dst}});
  expect_index(op, "index", index);
  const int64_t m = index.numel(), D = dst.size(-1), rows = dst.numel() / std::max<int64_t>(D, 1);
  VCHAT_CHECK(src.numel() == m * D, op << ": src " << shape_str(src.shape()) << " for " << m << " rows of " << D);
  VCHAT_DISPATCH(dt, T,
    launch_each(c, m * D, ScatterRowsEach<T>{ptr<T>(src), ptr<int32_t>(index), ptr<T>(dst), rows, D});
  );
}

void gather_rows(const Context& c, const Tensor& src, const Tensor& index, const Tensor& dst) {
  const char* op = "cuda::gather_rows";
  const DType dt = expect_compute(op, {{"src", src}, {"dst", dst}});
  expect_index(op, "index", index);
  const int64_t m = index.numel(), D = src.size(-1), rows = src.numel() / std::max<int64_t>(D, 1);
  VCHAT_CHECK(dst.numel() == m * D, op << ": dst " << shape_str(dst.shape()) << " for " << m << " rows of " << D);
  VCHAT_DISPATCH(dt, T,
    launch_each(c, m * D, GatherRowsEach<T>{ptr<T>(src), ptr<int32_t>(index), ptr<T>(dst), rows, D});
  );
}

// pixels [N, 3, S, S] -> patches [N * (S/P)^2, 3*P*P], (c, kh, kw) order within a patch.
void patchify(const Context& c, const Tensor& pixels, int64_t P, const Tensor& patches) {
  const char* op = "cuda::patchify";
  expect_f32(op, {{"pixels", pixels}});
  expect(op, {"patches", patches}, {DType::f32, DType::bf16});
  VCHAT_CHECK(pixels.dim() == 4 && pixels.size(1) == 3 && pixels.size(2) == pixels.size(3) && P > 0 &&
                  pixels.size(2) % P == 0,
              op << ": pixels " << shape_str(pixels.shape()) << " with patch " << P);
  const int64_t N = pixels.size(0), S = pixels.size(2), g = S / P, K = 3 * P * P;
  VCHAT_CHECK(patches.numel() == N * g * g * K, op << ": patches " << shape_str(patches.shape()) << ", expected ["
                                                   << N * g * g << ", " << K << "]");
  VCHAT_DISPATCH(patches.dtype(), T,
    launch_each(c, N * g * g * K, PatchifyEach<T>{ptr<float>(pixels), ptr<T>(patches), P, S, g});
  );
}

void vit_embed_fwd(const Context& c, const Tensor& patch_emb, const Tensor& cls, const Tensor& pos, const Tensor& out) {
  const char* op = "cuda::vit_embed_fwd";
  const DType dt = expect_compute(op, {{"out", out}, {"patch_emb", patch_emb}, {"cls", cls}, {"pos", pos}});
  VCHAT_CHECK(out.dim() == 3, op << ": out must be [N, T, W], got " << shape_str(out.shape()));
  const int64_t N = out.size(0), T_ = out.size(1), W = out.size(2);
  VCHAT_CHECK(patch_emb.numel() == N * (T_ - 1) * W && cls.numel() == W && pos.numel() == T_ * W,
              op << ": patch_emb " << shape_str(patch_emb.shape()) << " cls " << shape_str(cls.shape()) << " pos "
                 << shape_str(pos.shape()) << " for out " << shape_str(out.shape()));
  VCHAT_DISPATCH(dt, T,
    launch_each(c, N * T_ * W, VitEmbedFwdEach<T>{ptr<T>(patch_emb), ptr<T>(cls), ptr<T>(pos), ptr<T>(out), T_, W});
  );
}

void vit_embed_bwd(const Context& c, const Tensor& dout, const Tensor& dpatch_emb, const Tensor& dcls,
                   const Tensor& dpos) {
  const char* op = "cuda::vit_embed_bwd";
  expect(op, {"dout", dout}, {DType::f32, DType::bf16});
  VCHAT_CHECK(dout.dim() == 3, op << ": dout must be [N, T, W], got " << shape_str(dout.shape()));
  const int64_t N = dout.size(0), T_ = dout.size(1), W = dout.size(2);
  if (dpatch_emb.defined()) {
    expect_compute(op, {{"dout", dout}, {"dpatch_emb", dpatch_emb}});
    VCHAT_CHECK(dpatch_emb.numel() == N * (T_ - 1) * W, op << ": dpatch_emb " << shape_str(dpatch_emb.shape()));
  }
  if (dcls.defined()) {
    expect_f32(op, {{"dcls", dcls}});
    VCHAT_CHECK(dcls.numel() == W, op << ": dcls " << shape_str(dcls.shape()));
  }
  if (dpos.defined()) {
    expect_f32(op, {{"dpos", dpos}});
    VCHAT_CHECK(dpos.numel() == T_ * W, op << ": dpos " << shape_str(dpos.shape()));
  }
  VCHAT_DISPATCH(dout.dtype(), T,
    if (dpatch_emb.defined())
      launch_each(c, N * (T_ - 1) * W, VitEmbedBwdPatchEach<T>{ptr<T>(dout), ptr<T>(dpatch_emb), T_, W});
    if (dpos.defined()) launch_each(c, T_ * W, VitEmbedBwdSumEach<T>{ptr<T>(dout), ptr<float>(dpos), N, T_, W});
    if (dcls.defined()) launch_each(c, W, VitEmbedBwdSumEach<T>{ptr<T>(dout), ptr<float>(dcls), N, T_, W});
  );
}

// clang-format on

}  // namespace vchat::cuda
