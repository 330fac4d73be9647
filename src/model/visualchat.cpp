#include "model/visualchat.h"

#include "check.h"
#include "model/vocab_parallel.h"
#include "ops.h"
#include "parallel/comm.h"
#include "parallel/grid.h"

namespace vchat {

TrainSet parse_train_set(const std::string& s) {
  if (s == "default") return TrainSet::paper_default;
  if (s == "lora") return TrainSet::lora;
  if (s == "full") return TrainSet::full;
  throw ConfigError("--train=" + s + " is not one of: default, lora, full");
}

const char* train_set_name(TrainSet t) {
  switch (t) {
    case TrainSet::paper_default: return "default";
    case TrainSet::lora: return "lora";
    case TrainSet::full: return "full";
  }
  return "?";
}

ops::AttnMode parse_attention(const std::string& s) {
  if (s == "mmca") return ops::AttnMode::mmca;
  if (s == "causal") return ops::AttnMode::causal;
  throw ConfigError("--attention=" + s + " is not one of: mmca, causal");
}

VisualChatModel::VisualChatModel(const ModelConfig& cfg, const ModelOptions& opt, const ModelParallel& mp)
    : cfg_(cfg), opt_(opt), mp_(mp), table_(cfg, opt.train, opt.lora_rank) {
  const LlmConfig& l = cfg.llm;
  const int tp = mp.tp ? mp.tp->size() : 1, tp_rank = mp.tp ? mp.tp->rank() : 0;
  tp_.tp = mp.tp;
  if (tp > 1 && l.n_kv_heads < tp) {  // ranks sharing a KV head (TpSplit::kv_rows)
    const int head = static_cast<int>(tp_rank * l.n_kv_heads / tp);
    kv_replicas_ = mp.tp->split(head, tp_rank, mp.tp->name() + "-kv" + std::to_string(head));
    tp_.kv_replicas = kv_replicas_.get();
  }
  vocab_size_ = l.vocab_size / tp;
  vocab_begin_ = vocab_size_ * tp_rank;

  // 1. This rank's parameters, from the table: its stage's entries, each the slice its TP
  //    rank holds, trainable per --train, with the groups its gradient is summed over.
  for (const ParamSpec& spec : table_.all()) {
    if (!table_.on_stage(spec, mp.pp_rank, mp.pp_size)) continue;
    const TpPlacement pl = table_.placement(spec, tp_rank, tp);
    Param& p = params_.declare(spec.name, spec.init, pl.shard, &spec);
    params_.set_trainable(p, ParamTable::trains(spec, opt.train));
    p.grad_sum = pl.grad_sum == TpPlacement::tp_group ? mp.tp : pl.grad_sum == TpPlacement::kv_replicas ? tp_.kv_replicas : nullptr;
    p.counts_in_norm = pl.owner;
  }

  // 2. The layers bind to them (registration follows the table's order, restricted to this stage).
  if (first_stage()) {
    vit_ = VisionEncoder(params_, cfg.vision);
    proj_ = Projection(params_, cfg.vision.width, l.hidden, cfg.projection);
    embed_ = tp > 1 ? &params_.add_sharded("llm.embed_tokens.weight", {l.vocab_size, l.hidden}, 0, tp_rank, tp)
                    : &params_.add("llm.embed_tokens.weight", {l.vocab_size, l.hidden});
  }
  const LayerRange layers = stage_layers(static_cast<int>(l.n_layers), mp.pp_size, mp.pp_rank);
  first_layer_ = layers.begin;
  for (int i = layers.begin; i < layers.end; ++i) blocks_.emplace_back(params_, "llm.layers." + std::to_string(i), l, tp_);
  if (last_stage()) {
    final_norm_ = RMSNorm(params_, "llm.norm", l.hidden, l.rms_eps);
    lm_head_ = Linear(params_, "llm.lm_head", l.hidden, l.vocab_size, false, TpLayout::column_of(tp_rank, tp));
  }
  if (opt.train == TrainSet::lora)
    for (auto& b : blocks_) b.add_lora(params_, opt.lora_rank, opt.lora_alpha);
  params_.check_all_bound();
  refresh_trainable();
}

VisualChatModel::~VisualChatModel() = default;

void VisualChatModel::to(const ExecContext& ex, const PrecisionPolicy& policy, Placement placement) {
  if (placement == Placement::by_optimizer) {
    params_.set_exec(ex);  // ZeRO-2/3 place the weights themselves; casts still run with ex
  } else {
    ParamStore::Placement where = ParamStore::Placement::of(policy.compute);
    where.trainable_masters_on_host = placement == Placement::trainable_masters_on_host;
    params_.to(ex, where);
  }
  ex_ = ex;
  device_ = ex.device();
  compute_ = policy.compute;
}

// A host f32 copy of t (or t itself when it is one already).
Tensor host_f32(const ExecContext& ex, const Tensor& t) {
  if (t.device() == Device::cpu && t.dtype() == DType::f32) return t;
  Tensor f = t;
  if (t.dtype() != DType::f32) {
    f = Tensor::empty(t.shape(), DType::f32, t.device());
    ops::cast(ex, t.is_contiguous() ? t : t.clone(), f);
  }
  return f.to(Device::cpu);
}

void VisualChatModel::refresh_trainable() {
  vit_trains_ = false;
  bool proj_trains = false;
  for (auto& p : params_.all()) {
    if (p->trainable && p->spec->part == ModelPart::vision) vit_trains_ = true;
    if (p->trainable && p->spec->part == ModelPart::projection) proj_trains = true;
  }
  image_path_trains_ = vit_trains_ || proj_trains;
}

// The table's units in order of use. A unit's backward reads its weights unless none of its
// parameters' backward reads them (the embedding) or its part has no backward at all (a
// frozen image path): ZeRO-3 then neither gathers nor prefetches it for backward.
std::vector<ParamUnit> VisualChatModel::units() const {
  std::vector<ParamUnit> out;
  for (auto& p : params_.all()) {
    const ParamSpec& s = *p->spec;
    if (out.empty() || out.back().name != s.unit) {
      for (const ParamUnit& u : out)
        if (u.name == s.unit) throw std::logic_error("parameter table: unit " + s.unit + " is not contiguous");
      out.push_back({s.unit, {}, false});
    }
    const bool has_backward = s.part == ModelPart::vision       ? vit_trains_
                              : s.part == ModelPart::projection ? image_path_trains_
                                                                : true;
    out.back().params.push_back(p.get());
    out.back().backward_needs_weights = out.back().backward_needs_weights || (has_backward && s.backward_reads_value);
  }
  const size_t want = (first_stage() ? vit_.n_units() + 2 : 0) + blocks_.size() + (last_stage() ? 1 : 0);
  if (out.size() != want)
    throw std::logic_error("parameter table gives " + std::to_string(out.size()) + " units, the model uses " +
                           std::to_string(want));
  return out;
}

std::pair<int64_t, int64_t> VisualChatModel::my_images(int64_t n) const {
  const int64_t per = (n + tp_size() - 1) / tp_size(), r = tp_.rank();
  return {std::min(n, r * per), std::min(n, (r + 1) * per)};
}

// Activations of one micro-batch, released as backward walks past them.
struct VisualChatModel::Cache {
  int64_t n_images = 0;
  VisionCache vit;
  ProjectionCache proj;
  std::vector<LlamaBlockCache> blocks;
  NormCache final_norm;
  LinearCache head;
  Tensor logits, lse;  // last stage, until backward
};

Tensor VisualChatModel::image_features(const Tensor& pixels) const {
  if (!first_stage()) throw std::logic_error("image_features: the vision encoder lives on the first pipeline stage");
  VisionCache c;
  return vit_.forward(ex_, pixels, c);
}

Tensor VisualChatModel::extend(const Extension& e, KvCache& cache) const {
  if (tp_size() != 1 || mp_.pp_size != 1) throw std::invalid_argument("extend: generation runs the whole model on one rank");
  const int64_t n = static_cast<int64_t>(e.tokens.size()), pos = cache.length, H = cfg_.llm.hidden;
  const int64_t T = cfg_.vision.tokens_per_image(), n_img = e.pixels.defined() ? e.pixels.size(0) : 0;
  if (n == 0 || e.modality.size() != e.tokens.size())
    throw std::invalid_argument("extend: " + std::to_string(n) + " tokens and " + std::to_string(e.modality.size()) +
                                " modality entries (need the same number, at least one)");
  if (pos + n > cfg_.llm.max_seq_len)
    throw std::invalid_argument("the conversation would reach " + std::to_string(pos + n) + " positions, past llm.max_seq_len " +
                                std::to_string(cfg_.llm.max_seq_len) + " (clear it to start a new one)");
  std::vector<int32_t> ids(static_cast<size_t>(n)), rows;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t m = e.modality[i];
    if (m != ops::kText && m != ops::kImage) throw std::invalid_argument("extend: position " + std::to_string(i) + " is neither text nor image");
    ids[i] = m == ops::kImage ? -1 : e.tokens[i];
    if (m == ops::kText && (ids[i] < 0 || ids[i] >= cfg_.llm.vocab_size))
      throw std::invalid_argument("extend: token id " + std::to_string(ids[i]) + " outside the vocabulary of " +
                                  std::to_string(cfg_.llm.vocab_size));
    if (m == ops::kImage) rows.push_back(static_cast<int32_t>(i));
  }
  if (static_cast<int64_t>(rows.size()) != n_img * T)
    throw std::invalid_argument("extend: " + std::to_string(rows.size()) + " image positions for " + std::to_string(n_img) +
                                " images of " + std::to_string(T) + " tokens");

  // Embeddings, with each image's projected features in its positions (as stage_forward).
  Tensor x = Tensor::empty({n, H}, compute_, device_);
  ops::embedding_fwd(ex_, Tensor::from_vector(ids, {n}).to(device_), embed_->compute(), x);
  if (n_img > 0) {
    VisionCache vc;
    ProjectionCache pc;
    const Tensor img = proj_.forward(ex_, vit_.forward(ex_, e.pixels.to(device_), vc), pc);
    ops::scatter_rows(ex_, img, Tensor::from_vector(rows, {static_cast<int64_t>(rows.size())}).to(device_), x);
  }
  // Every layer: the new positions' keys and values join the cache, then they attend over it.
  cache.reserve(pos + n, static_cast<int64_t>(blocks_.size()), cfg_.llm.n_kv_heads, cfg_.llm.head_dim(), device_,
                compute_);
  cache.modality.resize(static_cast<size_t>(pos));
  cache.modality.insert(cache.modality.end(), e.modality.begin(), e.modality.end());
  const Tensor modality = Tensor::from_vector(cache.modality, {pos + n}).to(device_);
  for (size_t i = 0; i < blocks_.size(); ++i)
    x = blocks_[i].decode(ex_, x, cache.layers[i], modality, opt_.attention, pos);
  cache.length = pos + n;
  NormCache nc;
  LinearCache hc;
  return host_f32(ex_, lm_head_.forward(ex_, final_norm_.forward(ex_, x.slice(0, n - 1, n), nc), hc))
      .reshape({cfg_.llm.vocab_size});
}

Tensor VisualChatModel::stage_forward(int mb, const Batch& batch, const Tensor& input, bool backward_follows,
                                      MicroBatchResult* result, bool keep_logits, const Tensor& loss_acc) {
  // Shapes only: the contents were checked by Batch::validate in the data path.
  VCHAT_CHECK(batch.embed_ids.defined() && batch.embed_ids.numel() == batch.tokens.numel() &&
                  batch.image_rows.defined(),
              "micro-batch " << mb << " has no embedding ids / image rows (build batches with Batch::from_rows)");
  const int64_t B = batch.batch_size(), L = batch.seq_len(), N = B * L, H = cfg_.llm.hidden;
  if (caches_.count(mb)) throw std::logic_error("micro-batch " + std::to_string(mb) + " is already in flight");
  auto cache = std::make_unique<Cache>();
  Cache& c = *cache;
  Tensor x;

  if (first_stage()) {
    // 1. Where the image rows go (built with the batch): image positions in (b, l) scan
    //    order; their embedding ids are -1, so the lookup leaves them (and their gradient) alone.
    const int64_t T_img = cfg_.vision.tokens_per_image();
    VCHAT_CHECK(batch.image_rows.numel() == batch.n_images() * T_img,
                "batch has " << batch.image_rows.numel() << " image positions for " << batch.n_images()
                             << " images of " << T_img << " tokens");
    c.n_images = batch.n_images();

    // 2. Vision encoder, image-parallel over TP: each rank encodes its slice of the images
    //    and an all-gather joins the features (slices padded to equal size). The encoder
    //    and projection run their hooks even without images, so ZeRO-3 peers stay in step.
    const int64_t W = cfg_.vision.width;
    const auto [i0, i1] = my_images(c.n_images);
    Tensor feats = vit_.forward(ex_, i1 > i0 ? batch.pixels.slice(0, i0, i1) : Tensor(), c.vit, hook(0));
    if (!vit_trains_) c.vit = VisionCache();  // a frozen encoder's activations are dead now
    if (tp_size() > 1 && c.n_images > 0) {
      const int64_t per = (c.n_images + tp_size() - 1) / tp_size() * T_img;  // rows per rank
      Tensor mine = Tensor::zeros({per, W}, compute_, device_);
      if (feats.size(0) > 0) mine.slice(0, 0, feats.size(0)).copy_from(feats);
      Tensor all = Tensor::empty({per * tp_size(), W}, compute_, device_);
      mp_.tp->all_gather(mine.raw(), all.raw(), per * W, compute_);
      feats = all.slice(0, 0, c.n_images * T_img);
    }
    // 3. Projection, then the token embeddings with the image rows spliced in.
    hook(unit_proj()).before_forward(0);
    Tensor img = c.n_images > 0 ? proj_.forward(ex_, feats, c.proj) : Tensor();
    hook(unit_proj()).after_forward(0);
    hook(unit_embed()).before_forward(0);
    x = Tensor::empty({N, H}, compute_, device_);  // image rows are filled by the scatter below
    if (tp_size() > 1)
      vocab_parallel_embedding_fwd(ex_, batch.embed_ids, embed_->compute(), {vocab_begin_, vocab_size_}, *mp_.tp, x);
    else
      ops::embedding_fwd(ex_, batch.embed_ids, embed_->compute(), x);
    hook(unit_embed()).after_forward(0);
    if (img.defined()) ops::scatter_rows(ex_, img, batch.image_rows, x);
  } else {
    VCHAT_CHECK(input.defined() && input.dim() == 2 && input.size(0) == N && input.size(1) == H,
                "stage " << mp_.pp_rank << ": micro-batch " << mb << " input " << (input.defined() ? shape_str(input.shape()) : "none")
                         << ", expected [" << N << ", " << H << "]");
    x = input;
  }

  // 4. This stage's decoder blocks.
  c.blocks.resize(blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i) {
    hook(unit_block(i)).before_forward(0);
    x = blocks_[i].forward(ex_, x, batch.modality, opt_.attention, B, L, c.blocks[i], opt_.recompute);
    hook(unit_block(i)).after_forward(0);
  }

  if (last_stage()) {
    // 5. Final norm, lm_head (vocabulary-parallel), masked cross-entropy.
    hook(unit_head()).before_forward(0);
    c.logits = lm_head_.forward(ex_, final_norm_.forward(ex_, x, c.final_norm), c.head);
    hook(unit_head()).after_forward(0);
    c.lse = Tensor::empty({N}, DType::f32, device_);
    const Tensor targets = batch.targets.reshape({N});
    MicroBatchResult r;
    r.supervised = batch.supervised_count();
    const Tensor acc = loss_acc.defined() ? loss_acc : Tensor::zeros({1}, DType::f32, device_);
    if (tp_size() > 1)
      vocab_parallel_ce_fwd(ex_, c.logits, targets, {vocab_begin_, vocab_size_}, *mp_.tp, c.lse, acc);
    else
      ops::cross_entropy_fwd(ex_, c.logits, targets, c.lse, acc);
    if (!loss_acc.defined()) {  // the caller wants it now: one copy back
      r.loss_sum = acc.to_vector_f32()[0];
      r.loss = r.supervised ? r.loss_sum / r.supervised : 0.0;
    }
    if (keep_logits) {
      // Host f32 logits for the caller (evaluation, tests), whatever the device and dtype.
      // (A copy: backward overwrites c.logits with the gradient in place.)
      if (tp_size() == 1) {
        r.logits = c.logits.device() == Device::cpu && c.logits.dtype() == DType::f32 ? c.logits.clone()
                                                                                      : host_f32(ex_, c.logits);
      } else {  // [tp][N][V/tp] gathered where the logits are, then → [N][V] on the host
        const Tensor parts = Tensor::empty({tp_size(), N, vocab_size_}, c.logits.dtype(), c.logits.device());
        mp_.tp->all_gather(c.logits.raw(), parts.raw(), N * vocab_size_, c.logits.dtype());
        const Tensor hp = host_f32(ex_, parts);
        r.logits = Tensor::empty({N, cfg_.llm.vocab_size});
        for (int t = 0; t < tp_size(); ++t)
          for (int64_t i = 0; i < N; ++i)
            std::copy_n(hp.data<float>() + (t * N + i) * vocab_size_, vocab_size_,
                        r.logits.data<float>() + i * cfg_.llm.vocab_size + t * vocab_size_);
      }
    }
    if (result) *result = r;
    x = Tensor();
  }
  if (backward_follows) caches_[mb] = std::move(cache);
  return x;
}

Tensor VisualChatModel::stage_backward(int mb, const Batch& batch, const Tensor& doutput, float loss_scale) {
  auto it = caches_.find(mb);
  if (it == caches_.end()) throw std::logic_error("backward of micro-batch " + std::to_string(mb) + " without its forward");
  std::unique_ptr<Cache> owned = std::move(it->second);
  caches_.erase(it);
  Cache& c = *owned;
  const int64_t N = batch.batch_size() * batch.seq_len(), H = cfg_.llm.hidden;

  Tensor dx;
  if (last_stage()) {
    // 6. From the loss: dlogits reuses the logits buffer.
    const Tensor targets = batch.targets.reshape({N});
    if (tp_size() > 1)
      vocab_parallel_ce_bwd(ex_, c.logits, targets, {vocab_begin_, vocab_size_}, c.lse, loss_scale, c.logits);
    else
      ops::cross_entropy_bwd(ex_, c.logits, targets, c.lse, loss_scale, c.logits);
    hook(unit_head()).before_backward(0);
    Tensor dnormed = Tensor::empty({N, H}, compute_, device_);
    lm_head_.backward(ex_, c.logits, c.head, dnormed);
    tp_.all_reduce(dnormed);  // f: lm_head is column-parallel over the vocabulary
    c.logits = Tensor();
    dx = Tensor::empty({N, H}, compute_, device_);
    final_norm_.backward(ex_, dnormed, c.final_norm, dx);
    hook(unit_head()).after_backward(0);
  } else {
    VCHAT_CHECK(doutput.defined() && doutput.size(0) == N && doutput.size(1) == H,
                "stage " << mp_.pp_rank << ": micro-batch " << mb << " output gradient has the wrong shape");
    dx = doutput;
  }

  // 7. Decoder blocks in reverse.
  for (size_t i = blocks_.size(); i-- > 0;) {
    hook(unit_block(i)).before_backward(0);
    dx = blocks_[i].backward(ex_, dx, batch.modality, opt_.attention, c.blocks[i]);
    hook(unit_block(i)).after_backward(0);
  }
  if (!first_stage()) return dx;

  // 8. Split the embedding-output gradient: text rows → embed_tokens, image rows → the
  //    projection (and the encoder, when it trains, on this rank's image slice).
  if (embed_->trainable) {
    hook(unit_embed()).before_backward(0);
    if (tp_size() > 1)
      vocab_parallel_embedding_bwd(ex_, dx, batch.embed_ids, batch.embed_groups, {vocab_begin_, vocab_size_},
                                   embed_->grad);
    else
      ops::embedding_bwd(ex_, dx, batch.embed_ids, batch.embed_groups, embed_->grad);
    hook(unit_embed()).after_backward(0);
  }
  if (image_path_trains_) {
    const int64_t T_img = cfg_.vision.tokens_per_image(), W = cfg_.vision.width;
    Tensor dfeat;
    hook(unit_proj()).before_backward(0);
    if (c.n_images > 0) {
      Tensor dimg = Tensor::empty({batch.image_rows.numel(), H}, compute_, device_);
      ops::gather_rows(ex_, dx, batch.image_rows, dimg);
      dfeat = vit_trains_ ? Tensor::empty({batch.image_rows.numel(), W}, compute_, device_) : Tensor();
      proj_.backward(ex_, dimg, c.proj, dfeat);
    }
    hook(unit_proj()).after_backward(0);
    if (vit_trains_) {
      const auto [i0, i1] = my_images(c.n_images);
      vit_.backward(ex_, i1 > i0 ? dfeat.slice(0, i0 * T_img, i1 * T_img) : Tensor(), c.vit, hook(0));
    }
  }
  return Tensor();
}

MicroBatchResult VisualChatModel::forward_backward(const Batch& batch, bool backward, float grad_scale,
                                                   bool keep_logits, int64_t loss_tokens) {
  if (mp_.pp_size != 1) throw std::logic_error("forward_backward needs the whole model on one stage; use the pipeline");
  MicroBatchResult r;
  stage_forward(0, batch, Tensor(), backward, &r, keep_logits);
  if (backward) {
    const int64_t denom = loss_tokens > 0 ? loss_tokens : std::max<int64_t>(1, r.supervised);
    stage_backward(0, batch, Tensor(), grad_scale / static_cast<float>(denom));
  }
  return r;
}

}  // namespace vchat
