#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "data/sha256.h"
#include "io/safetensors.h"
#include "model/params.h"
#include "ops.h"

namespace vchat {

Trainer::Trainer(const TrainConfig& cfg, Comm* comm) : cfg_(cfg), comm_(comm ? comm : &self_) {
  if (cfg.threads > 0) {
    omp_set_num_threads(cfg.threads);
    openblas_set_num_threads(cfg.threads);
  }
  // Same seed on every rank: identical initial weights without a broadcast.
  model_ = std::make_unique<VisualChatModel>(cfg.model, cfg.model_options);
  init_params(model_->params(), cfg.seed);
  opt_ = std::make_unique<ZeroOptimizer>(model_->params(), *comm_, cfg.zero_stage, cfg.adamw);

  if (cfg.data_sources.empty()) {
    if (cfg.val_fraction > 0) throw ConfigError("--val-fraction needs --data");
    // Each DP rank draws its own synthetic stream.
    synthetic_ = std::make_unique<SyntheticBatches>(cfg.model, cfg.data, cfg.seed + 1 + comm_->rank());
  } else {
    data::LoaderConfig lc;
    for (const std::string& s : cfg.data_sources) lc.sources.push_back(data::parse_data_source(s));
    lc.seed = cfg.seed;
    lc.micro_batch = cfg.data.batch_size;
    lc.dp_rank = comm_->rank();
    lc.dp_size = dp_size();
    lc.global_batch = cfg.global_batch ? cfg.global_batch : cfg.data.batch_size * cfg.micro_batches * dp_size();
    lc.val_fraction = cfg.val_fraction;
    if (!cfg.tokenizer.empty()) lc.tokenizer_sha256 = data::sha256_file(cfg.tokenizer);
    lc.collate = {cfg.model.vision.tokens_per_image(), cfg.model.vision.image_size, cfg.data.seq_len, cfg.blank_images};
    loader_ = std::make_unique<data::DataLoader>(lc);
  }
  if (!cfg.metrics_file.empty() && is_root()) {
    metrics_.open(cfg.metrics_file, std::ios::app);
    if (!metrics_) throw ConfigError("--metrics '" + cfg.metrics_file + "': cannot open for writing");
  }
}

std::vector<Batch> Trainer::next_batches() {
  if (loader_) return loader_->next_step().micro;
  if (fixed_) return *fixed_;
  std::vector<Batch> batches;
  for (int64_t m = 0; m < cfg_.micro_batches; ++m) batches.push_back(synthetic_->next());
  if (cfg_.fixed_batch) fixed_ = batches;
  return batches;
}

StepStats Trainer::step() {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  StepStats s;

  // 1. This rank's micro-batches of the step.
  const std::vector<Batch> batches = next_batches();
  const int64_t dp = dp_size();

  // 2. The step loss is the mean CE over every supervised token of the global batch, so
  //    each micro-batch's summed loss is divided by the global count (one scalar
  //    all-reduce): the result does not depend on how samples fall into micro-batches/ranks.
  double counts[2] = {0, 0};  // supervised tokens, non-pad tokens
  for (const Batch& b : batches) {
    counts[0] += static_cast<double>(b.supervised_count());
    counts[1] += static_cast<double>(b.non_pad_count());
  }
  comm_->reset_stats();
  if (dp > 1) comm_->all_reduce_f64(counts, 2, ReduceOp::sum);
  const int64_t global_supervised = std::max<int64_t>(1, static_cast<int64_t>(counts[0]));

  // 3. Forward + backward each micro-batch; gradients accumulate.
  opt_->zero_grads();
  double loss_sum = 0;
  for (const Batch& b : batches)
    loss_sum += model_->forward_backward(b, /*backward=*/true, 1.f, /*keep_logits=*/false, global_supervised).loss_sum;

  if (dp > 1) comm_->all_reduce_f64(&loss_sum, 1, ReduceOp::sum);
  s.loss = loss_sum / static_cast<double>(global_supervised);
  s.tokens = static_cast<int64_t>(counts[1]);

  // 4. ZeRO: reduce the gradients over the DP group (each is already divided by the global
  //    count), clip by the global norm, update (this rank's shard for stages 1-2), gather.
  s.lr = cfg_.lr.at(step_);
  s.grad_norm = opt_->step(s.lr);
  s.comm_seconds = opt_->last_comm_seconds();
  s.comm_bytes = comm_->stats().bytes;
  s.step = ++step_;
  s.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return s;
}

EvalStats Trainer::evaluate() {
  EvalStats e;
  if (!loader_) return e;
  double sums[4] = {0, 0, 0, 0};  // loss sum, tokens, answers, exact answers
  for (const Batch& b : loader_->validation()) {
    const MicroBatchResult r = model_->forward_backward(b, /*backward=*/false, 1.f, /*keep_logits=*/true);
    sums[0] += r.loss_sum;
    sums[1] += r.supervised;
    // Teacher-forced exact match: an answer span counts when every target is the argmax.
    const int64_t N = r.logits.size(0), V = r.logits.size(1);
    const float* lg = r.logits.data<float>();
    const int32_t* tg = b.targets.data<int32_t>();
    const int64_t L = b.seq_len();
    for (int64_t row = 0; row * L < N; ++row) {
      bool in_span = false, ok = true;
      for (int64_t l = 0; l <= L; ++l) {  // l == L closes a span that runs to the row's end
        const int64_t i = row * L + l;
        if (l < L && tg[i] >= 0) {
          const float* x = lg + i * V;
          const bool hit = std::max_element(x, x + V) - x == tg[i];
          ok = in_span ? ok && hit : hit;
          in_span = true;
        } else if (in_span) {
          sums[2] += 1;
          sums[3] += ok;
          in_span = false;
        }
      }
    }
  }
  if (comm_->size() > 1) comm_->all_reduce_f64(sums, 4, ReduceOp::sum);
  e.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  e.tokens = static_cast<int64_t>(sums[1]);
  e.answers = static_cast<int64_t>(sums[2]);
  e.answers_exact = static_cast<int64_t>(sums[3]);
  return e;
}

void Trainer::save_trainable(const std::string& path) const {
  TensorFile f;
  for (Param* p : model_->params().trainable()) f.tensors[p->name] = p->value.clone();
  f.metadata = {{"step", std::to_string(step_)}, {"zero", std::to_string(opt_->stage())},
                {"dp", std::to_string(comm_->size())}};
  save_safetensors(path, f);
}

void Trainer::run() {
  const ParamStore& ps = model_->params();
  if (is_root())
    std::printf("vchat-train | model %s | train %s | attention %s | params %.2fM (trainable %.2fM) | dp %d | threads %d | data %s\n",
                cfg_.model.name.c_str(), train_set_name(cfg_.model_options.train),
                cfg_.model_options.attention == ops::AttnMode::mmca ? "mmca" : "causal", ps.numel(false) / 1e6,
                ps.numel(true) / 1e6, dp_size(), omp_get_max_threads(),
                loader_ ? (std::to_string(cfg_.data_sources.size()) + " dataset(s), " +
                           std::to_string(loader_->validation_samples()) + " held out").c_str()
                        : "synthetic");
  auto report_eval = [&](const char* when) {
    const EvalStats e = evaluate();
    if (is_root())
      std::printf("validation %s | step %lld | loss %.4f | answer accuracy %.4f (%lld/%lld, teacher-forced exact match)\n",
                  when, static_cast<long long>(step_), e.loss, e.accuracy(), static_cast<long long>(e.answers_exact),
                  static_cast<long long>(e.answers));
    std::fflush(stdout);
  };
  double elapsed = 0;
  for (int64_t i = 0; i < cfg_.steps; ++i) {
    const StepStats s = step();
    elapsed += s.seconds;
    if (is_root() && (s.step % cfg_.log_every == 0 || s.step == cfg_.steps)) {
      const double eta = elapsed / s.step * (cfg_.steps - s.step);
      std::printf(
          "step %5lld/%lld | loss %.4f | lr %.3e | grad norm %.4f | %.0f tok/s | %.0f ms (compute %.0f, comm %.0f) | eta %.0fs\n",
          static_cast<long long>(s.step), static_cast<long long>(cfg_.steps), s.loss, s.lr, s.grad_norm,
          s.tokens / s.seconds, s.seconds * 1e3, (s.seconds - s.comm_seconds) * 1e3, s.comm_seconds * 1e3, eta);
      std::fflush(stdout);
    }
    if (metrics_.is_open()) {
      const ZeroMemory mem = opt_->memory();
      nlohmann::json j = {{"step", s.step},          {"loss", s.loss},
                          {"lr", s.lr},              {"grad_norm", s.grad_norm},
                          {"tokens", s.tokens},      {"seconds", s.seconds},
                          {"comm_seconds", s.comm_seconds}, {"comm_bytes", s.comm_bytes},
                          {"trained_bytes", model_->params().numel(true) * 4},
                          {"mem_params", mem.params}, {"mem_grads", mem.grads}, {"mem_optimizer", mem.optimizer}};
      metrics_ << j.dump() << "\n" << std::flush;
    }
    if (loader_ && loader_->validation_samples() > 0 && cfg_.val_every > 0 && s.step % cfg_.val_every == 0 &&
        s.step != cfg_.steps)
      report_eval("periodic");
  }
  if (loader_ && loader_->validation_samples() > 0) report_eval("final");
  if (!cfg_.save_params.empty() && is_root()) save_trainable(cfg_.save_params);
}

}  // namespace vchat
