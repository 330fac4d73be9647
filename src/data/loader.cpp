#include "data/loader.h"

#include <cmath>

#include "data/manifest.h"
#include "data/shard.h"
#include "model/config.h"

namespace vchat::data {

DataSource parse_data_source(const std::string& spec) {
  const auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError("--data=" + spec + ": expected name=path[:weight]");
  DataSource d;
  d.name = spec.substr(0, eq);
  std::string rest = spec.substr(eq + 1);
  const auto colon = rest.rfind(':');
  if (colon != std::string::npos) {
    const std::string w = rest.substr(colon + 1);
    try {
      size_t used = 0;
      d.weight = std::stod(w, &used);
      if (used != w.size()) throw std::invalid_argument(w);
    } catch (const std::exception&) {
      throw ConfigError("--data=" + spec + ": weight '" + w + "' is not a number");
    }
    rest = rest.substr(0, colon);
  }
  if (rest.empty()) throw ConfigError("--data=" + spec + ": empty path");
  if (!(d.weight > 0) || !std::isfinite(d.weight)) throw ConfigError("--data=" + spec + ": weight must be positive");
  d.path = rest;
  return d;
}

DataLoader::DataLoader(const LoaderConfig& cfg, const LoaderState* resume) : cfg_(cfg) {
  if (cfg.sources.empty()) throw ConfigError("no --data given");
  if (cfg.global_batch % (static_cast<int64_t>(cfg.dp_size) * cfg.micro_batch) != 0)
    throw ConfigError("--global-batch=" + std::to_string(cfg.global_batch) + " is not a multiple of dp (" +
                      std::to_string(cfg.dp_size) + ") x --micro-batch-size (" + std::to_string(cfg.micro_batch) + ")");
  micro_per_step_ = cfg.global_batch / (cfg.dp_size * cfg.micro_batch);

  // Open every dataset; split each into train / validation with a fixed split seed, so the
  // held-out samples never depend on the blend or the training seed.
  ShardExpect expect{cfg.tokenizer_sha256, cfg.collate.image_size};
  std::vector<BlendSource> blend;
  std::vector<Sample> val_samples;
  for (size_t d = 0; d < cfg.sources.size(); ++d) {
    datasets_.push_back(std::make_unique<PreparedDataset>(cfg.sources[d].path, expect));
    PreparedDataset& ds = *datasets_.back();
    // The split seed comes from the dataset's name: reordering --data keeps every split.
    uint64_t split_seed = 1469598103934665603ull;  // FNV-1a, stable across toolchains
    for (unsigned char ch : cfg.sources[d].name) split_seed = (split_seed ^ ch) * 1099511628211ull;
    SplitIndices split = split_train_val(ds.size(), cfg.val_fraction, split_seed);
    if (split.train.empty())
      throw ConfigError("--data " + cfg.sources[d].name + "=" + cfg.sources[d].path + ": no training samples left");
    for (size_t v = 0; v < split.val.size(); ++v, ++val_total_)
      if (val_total_ % cfg.dp_size == cfg.dp_rank) val_samples.push_back(ds.read(split.val[v]));
    blend.push_back({cfg.sources[d].name, static_cast<int64_t>(split.train.size()), cfg.sources[d].weight});
    train_index_.push_back(std::move(split.train));
  }
  for (size_t i = 0; i < val_samples.size(); i += cfg.micro_batch) {
    std::vector<Sample> mb(val_samples.begin() + i,
                           val_samples.begin() + std::min(val_samples.size(), i + cfg.micro_batch));
    val_batches_.push_back(collate(mb, cfg.collate));
  }

  order_ = std::make_unique<BlendedOrder>(blend, cfg.seed);
  if (resume) {
    order_->check_compatible(*resume);
    if (resume->consumed % cfg.global_batch != 0)
      throw ConfigError("resume point " + std::to_string(resume->consumed) + " samples is not a multiple of --global-batch=" +
                        std::to_string(cfg.global_batch));
    order_->skip_to(resume->consumed);
  }
  consumed_handed_out_ = order_->consumed();
  blend_hash_ = order_->blend_hash();
  thread_ = std::thread(&DataLoader::produce, this);
}

DataLoader::~DataLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

// One optimizer step: the next global_batch samples of the global order, of which this
// rank reads only its share (dp_share), cut into micro-batches.
StepBatches DataLoader::build_step(BlendedOrder& order) {
  StepBatches step;
  step.first_sample = order.consumed();
  std::vector<SampleRef> refs;
  for (int64_t i = 0; i < cfg_.global_batch; ++i) refs.push_back(order.next());
  const std::vector<int64_t> mine = dp_share(step.first_sample, cfg_.global_batch, cfg_.dp_rank, cfg_.dp_size);
  std::vector<Sample> samples;
  for (int64_t g : mine) {
    const SampleRef& r = refs[g - step.first_sample];
    samples.push_back(datasets_[r.dataset]->read(train_index_[r.dataset][r.index]));
  }
  for (size_t i = 0; i < samples.size(); i += cfg_.micro_batch) {
    std::vector<Sample> mb(samples.begin() + i, samples.begin() + i + cfg_.micro_batch);
    step.micro.push_back(collate(mb, cfg_.collate));
  }
  return step;
}

void DataLoader::produce() {
  try {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || static_cast<int>(queue_.size()) < cfg_.prefetch_steps; });
        if (stop_) return;
      }
      StepBatches step = build_step(*order_);  // the slow part (HDF5 reads) runs unlocked
      {
        std::lock_guard<std::mutex> lock(mu_);
        queue_.push_back(std::move(step));
      }
      cv_.notify_all();
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::current_exception();
    cv_.notify_all();
  }
}

StepBatches DataLoader::next_step() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return !queue_.empty() || error_; });
  if (queue_.empty()) std::rethrow_exception(error_);
  StepBatches s = std::move(queue_.front());
  queue_.pop_front();
  consumed_handed_out_ = s.first_sample + cfg_.global_batch;
  lock.unlock();
  cv_.notify_all();
  return s;
}

LoaderState DataLoader::state() const {
  std::lock_guard<std::mutex> lock(mu_);
  // The producer runs ahead; the state is what the trainer has consumed, not what was read.
  return LoaderState{cfg_.seed, blend_hash_, consumed_handed_out_};
}

}  // namespace vchat::data
