#include "model/llama.h"

#include "check.h"
#include "ops.h"
#include "parallel/comm.h"

namespace vchat {

Recompute parse_recompute(const std::string& s) {
  if (s == "none") return Recompute::none;
  if (s == "block") return Recompute::block;
  throw ConfigError("--recompute=" + s + " is not one of: none, block");
}

int TensorParallel::rank() const { return tp ? tp->rank() : 0; }
int TensorParallel::size() const { return tp ? tp->size() : 1; }
void TensorParallel::all_reduce(const Tensor& t) const {
  if (size() > 1) tp->all_reduce(t, ReduceOp::sum);
}

// K and V: split by whole heads when there are at least as many KV heads as ranks;
// otherwise rank r holds KV head r·n_kv/tp, the one its query heads attend with (GQA
// groups are contiguous), replicated on the tp/n_kv ranks that share it.
static TpLayout kv_layout(const LlmConfig& cfg, const TensorParallel& tp) {
  TpLayout l = TpLayout::column_of(tp.rank(), tp.size());
  if (cfg.n_kv_heads >= tp.size()) return l;
  l.index = tp.rank() * cfg.n_kv_heads / tp.size();
  l.count = cfg.n_kv_heads;
  return l;
}

LlamaAttention::LlamaAttention(ParamStore& s, const std::string& p, const LlmConfig& cfg, const TensorParallel& tp)
    : q_(s, p + ".q_proj", cfg.hidden, cfg.n_heads * cfg.head_dim(), false, TpLayout::column_of(tp.rank(), tp.size())),
      k_(s, p + ".k_proj", cfg.hidden, cfg.n_kv_heads * cfg.head_dim(), false, kv_layout(cfg, tp)),
      v_(s, p + ".v_proj", cfg.hidden, cfg.n_kv_heads * cfg.head_dim(), false, kv_layout(cfg, tp)),
      o_(s, p + ".o_proj", cfg.n_heads * cfg.head_dim(), cfg.hidden, false, TpLayout::row_of(tp.rank(), tp.size())),
      tp_(tp),
      n_heads_(cfg.n_heads / tp.size()),
      n_kv_(k_.out() / cfg.head_dim()),
      hd_(cfg.head_dim()),
      theta_(cfg.rope_theta) {}

void LlamaAttention::add_lora(ParamStore& s, int64_t rank, float alpha) {
  for (Linear* l : {&q_, &k_, &v_, &o_}) l->add_lora(s, rank, alpha);
}

Tensor LlamaAttention::forward(const ExecContext& ex, const Tensor& x, const Tensor& modality, ops::AttnMode mode,
                               int64_t B, int64_t L, AttentionCache& c) const {
  c.qr = q_.forward(ex, x, c.q).reshape({B, L, n_heads_, hd_});
  c.kr = k_.forward(ex, x, c.k).reshape({B, L, n_kv_, hd_});
  c.vv = v_.forward(ex, x, c.v).reshape({B, L, n_kv_, hd_});
  ops::rope_(ex, c.qr, theta_, false);
  ops::rope_(ex, c.kr, theta_, false);
  c.att = Tensor::empty(c.qr.shape(), x.dtype(), x.device());
  c.saved = ops::attention_fwd(ex, mode, c.qr, c.kr, c.vv, modality, c.att);
  Tensor y = o_.forward(ex, c.att.reshape({B * L, n_heads_ * hd_}), c.o);
  tp_.all_reduce(y);  // g: o_proj is row-parallel, y a partial sum over the heads
  return y;
}

Tensor LlamaAttention::decode(const ExecContext& ex, const Tensor& x, KvCache::Layer& kv, const Tensor& modality,
                              ops::AttnMode mode, int64_t position) const {
  const int64_t n = x.size(0);
  LinearCache scratch;  // no backward follows
  Tensor q = q_.forward(ex, x, scratch).reshape({1, n, n_heads_, hd_});
  Tensor k = k_.forward(ex, x, scratch).reshape({1, n, n_kv_, hd_});
  Tensor v = v_.forward(ex, x, scratch);
  ops::rope_(ex, q, theta_, false, position);  // rotary at the positions in the whole sequence
  ops::rope_(ex, k, theta_, false, position);
  kv.k.slice(0, position, position + n).copy_from(k.reshape({n, n_kv_, hd_}));
  kv.v.slice(0, position, position + n).copy_from(v.reshape({n, n_kv_, hd_}));
  Tensor att = Tensor::empty({n, n_heads_, hd_}, x.dtype(), x.device());
  ops::attention_decode(ex, mode, q.reshape({n, n_heads_, hd_}), kv.k.slice(0, 0, position + n),
                        kv.v.slice(0, 0, position + n), modality, position, att);
  Tensor y = o_.forward(ex, att.reshape({n, n_heads_ * hd_}), scratch);
  tp_.all_reduce(y);  // g, as in forward
  return y;
}

void LlamaAttention::backward(const ExecContext& ex, const Tensor& dy, const Tensor& modality, ops::AttnMode mode,
                              AttentionCache& c, const Tensor& dx) const {
  Tensor datt = Tensor::empty(c.o.x.shape(), dy.dtype(), dy.device());
  o_.backward(ex, dy, c.o, datt);
  Tensor dq = Tensor::empty(c.qr.shape(), dy.dtype(), dy.device());
  Tensor dk = Tensor::empty(c.kr.shape(), dy.dtype(), dy.device());
  Tensor dv = Tensor::empty(c.vv.shape(), dy.dtype(), dy.device());
  ops::attention_bwd(ex, mode, datt.reshape(c.qr.shape()), c.qr, c.kr, c.vv, modality, c.att, c.saved, dq, dk, dv);
  c.saved = Tensor();  // on the CPU the largest activation: release it as soon as possible
  ops::rope_(ex, dq, theta_, true);
  ops::rope_(ex, dk, theta_, true);
  const int64_t rows = dx.size(0);
  q_.backward(ex, dq.reshape({rows, n_heads_ * hd_}), c.q, dx);
  k_.backward(ex, dk.reshape({rows, n_kv_ * hd_}), c.k, dx, 1.f);
  v_.backward(ex, dv.reshape({rows, n_kv_ * hd_}), c.v, dx, 1.f);
  tp_.all_reduce(dx);  // f: q, k and v each saw the whole input; their dx are partial sums
}

LlamaMLP::LlamaMLP(ParamStore& s, const std::string& p, const LlmConfig& cfg, const TensorParallel& tp)
    : gate_(s, p + ".gate_proj", cfg.hidden, cfg.intermediate, false, TpLayout::column_of(tp.rank(), tp.size())),
      up_(s, p + ".up_proj", cfg.hidden, cfg.intermediate, false, TpLayout::column_of(tp.rank(), tp.size())),
      down_(s, p + ".down_proj", cfg.intermediate, cfg.hidden, false, TpLayout::row_of(tp.rank(), tp.size())),
      tp_(tp) {}

void LlamaMLP::add_lora(ParamStore& s, int64_t rank, float alpha) {
  for (Linear* l : {&gate_, &up_, &down_}) l->add_lora(s, rank, alpha);
}

Tensor LlamaMLP::forward(const ExecContext& ex, const Tensor& x, MlpCache& c) const {
  c.g = gate_.forward(ex, x, c.gate);
  c.u = up_.forward(ex, x, c.up);
  Tensor a = Tensor::empty(c.g.shape(), x.dtype(), x.device());
  ops::swiglu_fwd(ex, c.g, c.u, a);
  Tensor y = down_.forward(ex, a, c.down);
  tp_.all_reduce(y);  // g: down_proj is row-parallel
  return y;
}

void LlamaMLP::backward(const ExecContext& ex, const Tensor& dy, MlpCache& c, const Tensor& dx) const {
  Tensor da = Tensor::empty(c.g.shape(), dy.dtype(), dy.device());
  down_.backward(ex, dy, c.down, da);
  Tensor dg = Tensor::empty(c.g.shape(), dy.dtype(), dy.device());
  ops::swiglu_bwd(ex, da, c.g, c.u, dg, da);  // du overwrites da in place: da is not read after
  gate_.backward(ex, dg, c.gate, dx);
  up_.backward(ex, da, c.up, dx, 1.f);
  tp_.all_reduce(dx);  // f, as in attention
}

LlamaBlock::LlamaBlock(ParamStore& s, const std::string& p, const LlmConfig& cfg, const TensorParallel& tp)
    : norm1_(s, p + ".input_layernorm", cfg.hidden, cfg.rms_eps),
      norm2_(s, p + ".post_attention_layernorm", cfg.hidden, cfg.rms_eps),
      attn_(s, p + ".self_attn", cfg, tp),
      mlp_(s, p + ".mlp", cfg, tp) {}

void LlamaBlock::add_lora(ParamStore& s, int64_t rank, float alpha) {
  attn_.add_lora(s, rank, alpha);
  mlp_.add_lora(s, rank, alpha);
}

Tensor LlamaBlock::forward(const ExecContext& ex, const Tensor& x, const Tensor& modality, ops::AttnMode mode,
                           int64_t B, int64_t L, LlamaBlockCache& c, Recompute recompute) const {
  if (recompute == Recompute::block) {
    LlamaBlockCache scratch;  // freed on return
    Tensor y = forward(ex, x, modality, mode, B, L, scratch);
    c = LlamaBlockCache();
    c.input = x;  // x is never written in place (the residual adds write h and y)
    c.B = B;
    c.L = L;
    c.recompute = true;
    return y;
  }
  Tensor h = attn_.forward(ex, norm1_.forward(ex, x, c.norm1), modality, mode, B, L, c.attn);
  Tensor y = mlp_.forward(ex, norm2_.add_forward(ex, h, x, c.norm2), c.mlp);  // h += x, then norm2(h)
  ops::add(ex, y, h, y);
  return y;
}

Tensor LlamaBlock::decode(const ExecContext& ex, const Tensor& x, KvCache::Layer& kv, const Tensor& modality,
                          ops::AttnMode mode, int64_t position) const {
  NormCache n1, n2;
  MlpCache mc;
  Tensor h = attn_.decode(ex, norm1_.forward(ex, x, n1), kv, modality, mode, position);
  Tensor y = mlp_.forward(ex, norm2_.add_forward(ex, h, x, n2), mc);
  ops::add(ex, y, h, y);
  return y;
}

Tensor LlamaBlock::backward(const ExecContext& ex, const Tensor& dy, const Tensor& modality, ops::AttnMode mode,
                            LlamaBlockCache& c) const {
  if (c.recompute) {
    const Tensor x = c.input;
    const int64_t B = c.B, L = c.L;
    c = LlamaBlockCache();
    forward(ex, x, modality, mode, B, L, c);
  }
  Tensor tmp = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  // y = h + mlp(norm2(h)):  dh = dy + norm2ᵀ(mlpᵀ(dy)), the residual's dy added by the norm
  mlp_.backward(ex, dy, c.mlp, tmp);
  Tensor dh = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  norm2_.backward(ex, tmp, c.norm2, dh, dy);
  // h = x + attn(norm1(x)):  dx = dh + norm1ᵀ(attnᵀ(dh))
  attn_.backward(ex, dh, modality, mode, c.attn, tmp);
  Tensor dx = Tensor::empty(dy.shape(), dy.dtype(), dy.device());
  norm1_.backward(ex, tmp, c.norm1, dx, dh);
  c = LlamaBlockCache();  // activations of this micro-batch are no longer needed
  return dx;
}

}  // namespace vchat
