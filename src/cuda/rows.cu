// Row movement: embedding lookup and its deterministic backward, scatter/gather of image
// rows, ViT patch extraction and embeddings. Memory-bound copies, one thread per element.
#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

void expect_index(const char* op, const char* name, const Tensor& t) { expect(op, {name, t}, {DType::i32}); }

}  // namespace

// Out-of-range ids are the data path's to reject (Batch::validate); here they give 0 rows,
// which is also how another rank's vocabulary slice and image positions (-1) look.
void embedding_fwd(const Context& c, const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_begin) {
  const char* op = "cuda::embedding_fwd";
  const DType dt = expect_compute(op, {{"table", table}, {"out", out}});
  expect_index(op, "ids", ids);
  const int64_t n = ids.numel(), V = table.size(0), D = table.size(1);
  VCHAT_CHECK(out.numel() == n * D, op << ": out " << shape_str(out.shape()) << " for " << n << " ids of width " << D);
  VCHAT_DISPATCH(dt, T,
    const int32_t* id = ptr<int32_t>(ids);
    const T* t = ptr<T>(table);
    T* o = ptr<T>(out);
    launch_each(c, n * D, [=] __device__(int64_t i) {
      const int64_t r = i / D, col = i % D, row = int64_t(id[r]) - vocab_begin;
      o[i] = row >= 0 && row < V ? t[row * D + col] : T(0.f);
    });
  );
}

// One thread per (group, column): sums the group's rows in position order into the table
// row. Groups are distinct ids, so no two threads touch one table element.
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
    const T* dy = ptr<T>(dout);
    const int32_t *order = ptr<int32_t>(g.order), *off = ptr<int32_t>(g.offsets), *gid = ptr<int32_t>(g.ids);
    float* dt = ptr<float>(dtable);
    launch_each(c, groups * D, [=] __device__(int64_t i) {
      const int64_t k = i / D, col = i % D, row = int64_t(gid[k]) - vocab_begin;
      if (row < 0 || row >= V) return;
      // Added one by one onto the table's value, in position order: the CPU's exact sum.
      float s = dt[row * D + col];
      for (int32_t j = off[k]; j < off[k + 1]; ++j) s += ld(dy, int64_t(order[j]) * D + col);
      dt[row * D + col] = s;
    });
  );
}

void scatter_rows(const Context& c, const Tensor& src, const Tensor& index, const Tensor& dst) {
  const char* op = "cuda::scatter_rows";
  const DType dt = expect_compute(op, {{"src", src}, {"dst", dst}});
  expect_index(op, "index", index);
  const int64_t m = index.numel(), D = dst.size(-1), rows = dst.numel() / std::max<int64_t>(D, 1);
  VCHAT_CHECK(src.numel() == m * D, op << ": src " << shape_str(src.shape()) << " for " << m << " rows of " << D);
  VCHAT_DISPATCH(dt, T,
    const T* s = ptr<T>(src);
    T* d = ptr<T>(dst);
    const int32_t* idx = ptr<int32_t>(index);
    launch_each(c, m * D, [=] __device__(int64_t i) {
      const int64_t r = idx[i / D];
      if (r >= 0 && r < rows) d[r * D + i % D] = s[i];
    });
  );
}

void gather_rows(const Context& c, const Tensor& src, const Tensor& index, const Tensor& dst) {
  const char* op = "cuda::gather_rows";
  const DType dt = expect_compute(op, {{"src", src}, {"dst", dst}});
  expect_index(op, "index", index);
  const int64_t m = index.numel(), D = src.size(-1), rows = src.numel() / std::max<int64_t>(D, 1);
  VCHAT_CHECK(dst.numel() == m * D, op << ": dst " << shape_str(dst.shape()) << " for " << m << " rows of " << D);
  VCHAT_DISPATCH(dt, T,
    const T* s = ptr<T>(src);
    T* d = ptr<T>(dst);
    const int32_t* idx = ptr<int32_t>(index);
    launch_each(c, m * D, [=] __device__(int64_t i) {
      const int64_t r = idx[i / D];
      d[i] = r >= 0 && r < rows ? s[r * D + i % D] : T(0.f);
    });
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
    const float* px = ptr<float>(pixels);
    T* out = ptr<T>(patches);
    launch_each(c, N * g * g * K, [=] __device__(int64_t i) {
      const int64_t patch = i / K, k = i % K, n = patch / (g * g), pr = (patch / g) % g, pc = patch % g;
      const int64_t ch = k / (P * P), kh = (k / P) % P, kw = k % P;
      st(out, i, px[((n * 3 + ch) * S + pr * P + kh) * S + pc * P + kw]);
    });
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
    const T *pe = ptr<T>(patch_emb), *cl = ptr<T>(cls), *ps = ptr<T>(pos);
    T* o = ptr<T>(out);
    launch_each(c, N * T_ * W, [=] __device__(int64_t i) {
      const int64_t n = i / (T_ * W), t = (i / W) % T_, w = i % W;
      const float src = t == 0 ? ld(cl, w) : ld(pe, (n * (T_ - 1) + t - 1) * W + w);
      st(o, i, src + ld(ps, t * W + w));
    });
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
    const T* g = ptr<T>(dout);
    if (dpatch_emb.defined()) {
      T* d = ptr<T>(dpatch_emb);
      launch_each(c, N * (T_ - 1) * W, [=] __device__(int64_t i) {
        const int64_t n = i / ((T_ - 1) * W), t = (i / W) % (T_ - 1) + 1, w = i % W;
        d[i] = g[(n * T_ + t) * W + w];
      });
    }
    // Image order is the summation order, one thread per element: deterministic.
    if (dpos.defined()) {
      float* d = ptr<float>(dpos);
      launch_each(c, T_ * W, [=] __device__(int64_t i) {
        float s = 0.f;
        for (int64_t n = 0; n < N; ++n) s += ld(g, n * T_ * W + i);
        d[i] += s;
      });
    }
    if (dcls.defined()) {
      float* d = ptr<float>(dcls);
      launch_each(c, W, [=] __device__(int64_t w) {
        float s = 0.f;
        for (int64_t n = 0; n < N; ++n) s += ld(g, n * T_ * W + w);
        d[w] += s;
      });
    }
  );
}

}  // namespace vchat::cuda
