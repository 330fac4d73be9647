#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "model/params.h"

namespace vchat {

Trainer::Trainer(const TrainConfig& cfg) : cfg_(cfg), data_(cfg.model, cfg.data, cfg.seed + 1) {
  if (cfg.threads > 0) {
    omp_set_num_threads(cfg.threads);
    openblas_set_num_threads(cfg.threads);
  }
  model_ = std::make_unique<VisualChatModel>(cfg.model, cfg.model_options);
  init_params(model_->params(), cfg.seed);
  opt_ = std::make_unique<AdamW>(model_->params().trainable(), cfg.adamw);
  if (!cfg.metrics_file.empty()) {
    metrics_.open(cfg.metrics_file, std::ios::app);
    if (!metrics_) throw ConfigError("--metrics '" + cfg.metrics_file + "': cannot open for writing");
  }
}

StepStats Trainer::step() {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  StepStats s;
  const int64_t M = cfg_.micro_batches;

  // 1. The micro-batches of this step.
  std::vector<Batch> batches;
  if (fixed_) {
    batches = *fixed_;
  } else {
    for (int64_t m = 0; m < M; ++m) batches.push_back(data_.next());
    if (cfg_.fixed_batch) fixed_ = batches;
  }

  // 2. Forward + backward each; the step loss is the mean of micro-batch means.
  model_->params().zero_grads();
  for (const Batch& b : batches) {
    const MicroBatchResult r = model_->forward_backward(b, /*backward=*/true, 1.f / static_cast<float>(M));
    s.loss += r.loss / M;
    s.tokens += b.non_pad_count();
  }

  // 3. Clip and update.
  s.lr = cfg_.lr.at(step_);
  s.grad_norm = opt_->step(s.lr);
  s.step = ++step_;
  s.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return s;
}

void Trainer::run() {
  const ParamStore& ps = model_->params();
  std::printf("vchat-train | model %s | train %s | attention %s | params %.2fM (trainable %.2fM) | threads %d\n",
              cfg_.model.name.c_str(), train_set_name(cfg_.model_options.train),
              cfg_.model_options.attention == ops::AttnMode::mmca ? "mmca" : "causal", ps.numel(false) / 1e6,
              ps.numel(true) / 1e6, omp_get_max_threads());
  double elapsed = 0;
  for (int64_t i = 0; i < cfg_.steps; ++i) {
    const StepStats s = step();
    elapsed += s.seconds;
    if (s.step % cfg_.log_every == 0 || s.step == cfg_.steps) {
      const double eta = elapsed / s.step * (cfg_.steps - s.step);
      std::printf("step %5lld/%lld | loss %.4f | lr %.3e | grad norm %.4f | %.0f tok/s | %.0f ms | eta %.0fs\n",
                  static_cast<long long>(s.step), static_cast<long long>(cfg_.steps), s.loss, s.lr, s.grad_norm,
                  s.tokens / s.seconds, s.seconds * 1e3, eta);
      std::fflush(stdout);
    }
    if (metrics_.is_open()) {
      nlohmann::json j = {{"step", s.step}, {"loss", s.loss},       {"lr", s.lr},
                          {"grad_norm", s.grad_norm}, {"tokens", s.tokens}, {"seconds", s.seconds}};
      metrics_ << j.dump() << "\n" << std::flush;
    }
  }
}

}  // namespace vchat
