#include "model/vit.h"

#include "ops.h"

namespace vchat {

VitLayer::VitLayer(ParamStore& s, const std::string& p, const VisionConfig& cfg)
    : ln1_(s, p + ".layer_norm1", cfg.width, cfg.ln_eps),
      ln2_(s, p + ".layer_norm2", cfg.width, cfg.ln_eps),
      q_(s, p + ".self_attn.q_proj", cfg.width, cfg.width, true),
      k_(s, p + ".self_attn.k_proj", cfg.width, cfg.width, true),
      v_(s, p + ".self_attn.v_proj", cfg.width, cfg.width, true),
      o_(s, p + ".self_attn.out_proj", cfg.width, cfg.width, true),
      fc1_(s, p + ".mlp.fc1", cfg.width, cfg.intermediate, true),
      fc2_(s, p + ".mlp.fc2", cfg.intermediate, cfg.width, true),
      heads_(cfg.n_heads),
      hd_(cfg.width / cfg.n_heads),
      act_(cfg.act) {}

Tensor VitLayer::forward(const ExecContext& ex, const Tensor& x, int64_t n_img, int64_t T, VitLayerCache& c) const {
  Tensor xn = ln1_.forward(ex, x, c.ln1);
  c.qh = q_.forward(ex, xn, c.q).reshape({n_img, T, heads_, hd_});
  c.kh = k_.forward(ex, xn, c.k).reshape({n_img, T, heads_, hd_});
  c.vh = v_.forward(ex, xn, c.v).reshape({n_img, T, heads_, hd_});
  c.att = Tensor::empty(c.qh.shape(), x.dtype(), x.device());
  c.saved = ops::attention_fwd(ex, ops::AttnMode::full, c.qh, c.kh, c.vh, Tensor(), c.att);
  Tensor h = o_.forward(ex, c.att.reshape({n_img * T, heads_ * hd_}), c.o);
  ops::add(ex, h, x, h);
  c.pre_act = fc1_.forward(ex, ln2_.forward(ex, h, c.ln2), c.fc1);
  Tensor a = Tensor::empty(c.pre_act.shape(), x.dtype(), x.device());
  ops::gelu_fwd(ex, act_, c.pre_act, a);
  Tensor y = fc2_.forward(ex, a, c.fc2);
  ops::add(ex, y, h, y);
  return y;
}

Tensor VitLayer::backward(const ExecContext& ex, const Tensor& dy, VitLayerCache& c) const {
  Tensor da = Tensor::empty(c.pre_act.shape(), dy.dtype(), dy.device());
  fc2_.backward(ex, dy, c.fc2, da);
  ops::gelu_bwd(ex, act_, da, c.pre_act, da);
  Tensor tmp = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  fc1_.backward(ex, da, c.fc1, tmp);
  Tensor dh = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  ln2_.backward(ex, tmp, c.ln2, dh);
  ops::add(ex, dh, dy, dh);
  Tensor datt = Tensor::empty(c.qh.shape(), dy.dtype(), dy.device());
  const int64_t rows = dy.size(0), W = heads_ * hd_;
  o_.backward(ex, dh, c.o, datt.reshape({rows, W}));
  Tensor dq = Tensor::empty(c.qh.shape(), dy.dtype(), dy.device());
  Tensor dk = Tensor::empty(c.kh.shape(), dy.dtype(), dy.device());
  Tensor dv = Tensor::empty(c.vh.shape(), dy.dtype(), dy.device());
  ops::attention_bwd(ex, ops::AttnMode::full, datt, c.qh, c.kh, c.vh, Tensor(), c.att, c.saved, dq, dk, dv);
  q_.backward(ex, dq.reshape({rows, W}), c.q, tmp);
  k_.backward(ex, dk.reshape({rows, W}), c.k, tmp, 1.f);
  v_.backward(ex, dv.reshape({rows, W}), c.v, tmp, 1.f);
  Tensor dx = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  ln1_.backward(ex, tmp, c.ln1, dx);
  ops::add(ex, dx, dh, dx);
  c = VitLayerCache();
  return dx;
}

VisionEncoder::VisionEncoder(ParamStore& s, const VisionConfig& cfg)
    : cfg_(cfg),
      patch_(s, "vit.embeddings.patch_embedding", 3 * cfg.patch_size * cfg.patch_size, cfg.width, false) {
  cls_ = &s.add("vit.embeddings.class_embedding", {cfg.width});
  pos_ = &s.add("vit.embeddings.position_embedding.weight", {cfg.n_positions(), cfg.width});
  pre_ = LayerNorm(s, "vit.pre_layrnorm", cfg.width, cfg.ln_eps);
  for (int64_t i = 0; i < cfg.layers_used(); ++i)
    layers_.emplace_back(s, "vit.encoder.layers." + std::to_string(i), cfg);
}

// The rows of the patch tokens (every row but each image's CLS) of N images of T tokens.
static Tensor patch_rows(int64_t N, int64_t T, Device device) {
  std::vector<int32_t> rows;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = 1; t < T; ++t) rows.push_back(static_cast<int32_t>(n * T + t));
  return Tensor::from_vector(rows, {N * (T - 1)}).to(device);
}

Tensor VisionEncoder::forward(const ExecContext& ex, const Tensor& pixels, VisionCache& c,
                              const HookCursor& hooks) const {
  const int64_t N = pixels.defined() ? pixels.size(0) : 0, np = cfg_.grid() * cfg_.grid(), T = np + 1, W = cfg_.width;
  c.n_img = N;
  c.layers.resize(layers_.size());
  if (N == 0) {
    for (int u = 0; u < n_units(); ++u) {
      hooks.before_forward(u);
      hooks.after_forward(u);
    }
    return Tensor::empty({0, W});
  }
  hooks.before_forward(0);
  const DType compute = cls_->compute().dtype();  // the weights' compute dtype (bf16 or f32)
  Tensor patches = Tensor::empty({N * np, 3 * cfg_.patch_size * cfg_.patch_size}, compute, pixels.device());
  ops::patchify(ex, pixels, cfg_.patch_size, patches);
  Tensor pe = patch_.forward(ex, patches, c.patch);
  Tensor emb = Tensor::empty({N, T, W}, compute, pixels.device());
  ops::vit_embed_fwd(ex, pe, cls_->compute(), pos_->compute(), emb);
  Tensor h = pre_.forward(ex, emb.flatten_rows(), c.pre);
  hooks.after_forward(0);
  for (size_t i = 0; i < layers_.size(); ++i) {
    hooks.before_forward(1 + static_cast<int>(i));
    h = layers_[i].forward(ex, h, N, T, c.layers[i]);
    hooks.after_forward(1 + static_cast<int>(i));
  }
  if (cfg_.keep_cls) return h;
  // feature_select "patch": drop each image's CLS row.
  Tensor out = Tensor::empty({N * np, W}, h.dtype(), h.device());
  ops::gather_rows(ex, h, patch_rows(N, T, h.device()), out);
  return out;
}

void VisionEncoder::backward(const ExecContext& ex, const Tensor& dfeat, VisionCache& c,
                             const HookCursor& hooks) const {
  const int64_t N = c.n_img, np = cfg_.grid() * cfg_.grid(), T = np + 1, W = cfg_.width;
  if (N == 0) {
    for (int u = n_units(); u-- > 0;) {
      hooks.before_backward(u);
      hooks.after_backward(u);
    }
    return;
  }
  Tensor dh = dfeat;
  if (!cfg_.keep_cls) {
    dh = Tensor::zeros({N * T, W}, dfeat.dtype(), dfeat.device());
    ops::scatter_rows(ex, dfeat, patch_rows(N, T, dfeat.device()), dh);
  }
  for (size_t i = layers_.size(); i-- > 0;) {
    hooks.before_backward(1 + static_cast<int>(i));
    dh = layers_[i].backward(ex, dh, c.layers[i]);
    hooks.after_backward(1 + static_cast<int>(i));
  }
  hooks.before_backward(0);
  Tensor demb = Tensor::empty({N * T, W}, dh.dtype(), dh.device());
  pre_.backward(ex, dh, c.pre, demb);
  Tensor dpe = patch_.weight()->trainable ? Tensor::empty({N * np, W}, dh.dtype(), dh.device()) : Tensor();
  ops::vit_embed_bwd(ex, demb.reshape({N, T, W}), dpe, cls_->trainable ? cls_->grad : Tensor(),
                     pos_->trainable ? pos_->grad : Tensor());
  if (dpe.defined()) patch_.backward(ex, dpe, c.patch, Tensor());
  hooks.after_backward(0);
}

}  // namespace vchat
