#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <utility>
#include <nlohmann/json.hpp>

#include "data/sha256.h"
#include "nn/params.h"
#include "ops.h"
#include "parallel/pipeline.h"
#include "checkpoint/reshard.h"
#include "train/signals.h"
#include "train/flops.h"

namespace vchat {


Trainer::Trainer(const TrainConfig& cfg, Grid* grid) : cfg_(cfg) {
  if (cfg.threads > 0) {
    omp_set_num_threads(cfg.threads);
    openblas_set_num_threads(cfg.threads);
  }
  if (!grid) own_grid_ = std::make_unique<Grid>(self_, GridShape{});
  grid_ = grid ? grid : own_grid_.get();
  const Grid& g = *grid_;

  // This rank's part of the model. Every rank draws the same full initial weights from the
  // same seed (per parameter, init_params) and keeps its slice: no broadcast, and every
  // layout starts from the one-rank model.
  model_ = std::make_unique<VisualChatModel>(cfg.model, cfg.model_options,
                                             ModelParallel{&g.tp(), g.coord().pp, g.shape().pp});
  init_params(model_->params(), cfg.seed);
  // The grid's communicators carry device buffers (NCCL, or MPI staging them: the app chose).
  if (cfg.device == Device::cuda) {
    select_gpu(g.world().rank());
    set_deterministic_attention(cfg.deterministic_attention);
  }
  // How every op of the run is issued (on cuda: the device's compute stream and handles),
  // handed to the model, the optimizer and the batch uploads.
  const ExecContext ex = ExecContext::of(cfg.device);
  // Before the optimizer flattens them. ZeRO-2/3 instead move only this rank's shards, and
  // ZeRO-1 under bf16 only its shard of the trainable fp32 masters (the rest as stage 0).
  const PrecisionPolicy policy = PrecisionPolicy::of(cfg.precision);
  using Placement = VisualChatModel::Placement;
  if (cfg.device == Device::cuda)
    model_->to(ex, policy,
               cfg.zero_stage >= 2                            ? Placement::by_optimizer
               : cfg.zero_stage == 1 && policy.working_copy() ? Placement::trainable_masters_on_host
                                                              : Placement::moved);
  device_batches_ = std::make_unique<DeviceBatches>(ex);
  if (cfg.zero_stage >= 2) {
    // Stage 2 is stage 3 with the weights kept whole between steps (zero3.h): masters,
    // moments and gradients sharded per unit, each unit's gradient reduced in its backward.
    auto z = std::make_unique<Zero3Optimizer>(model_->units(), g.dp(), cfg.adamw, &g.mp(), ex, policy.compute,
                                              /*resident=*/cfg.zero_stage == 2);
    zero3_ = z.get();
    model_->set_hooks(zero3_);
    opt_ = std::move(z);
  } else {
    auto z = std::make_unique<ZeroOptimizer>(model_->params(), g.dp(), cfg.zero_stage, cfg.adamw, &g.mp());
    // Over several replicas each unit's gradients can be reduced as soon as the step's last
    // backward of it is done, under the backward of the units before it: worth it only where
    // the collectives run beside compute (NCCL); over MPI the per-unit collectives only add
    // latency (--overlap-grad-reduce auto leaves them off there; `on` forces them, tested).
    const bool overlap =
        cfg.overlap_grad_reduce == "on" || (cfg.overlap_grad_reduce == "auto" && g.dp().overlaps_compute());
    if (overlap) z->overlap_with_backward(model_->units());
    if (z->overlapping()) {
      zero01_ = z.get();
      model_->set_hooks(zero01_);
    }
    opt_ = std::move(z);
  }

  // The checkpoint to resume from: --resume auto takes --save-dir's latest (or starts
  // fresh); a fresh run never writes over another run's checkpoints.
  std::string resume_dir;
  std::optional<ckpt::Manifest> resume;
  if (cfg.resume == "auto") {
    resume_dir = ckpt::latest_checkpoint(cfg.save_dir).value_or("");
  } else if (!cfg.resume.empty()) {
    resume_dir = ckpt::resolve_checkpoint(cfg.resume, "--resume");
  } else if (!cfg.save_dir.empty()) {
    if (auto latest = ckpt::latest_checkpoint(cfg.save_dir))
      throw ConfigError("--save-dir " + cfg.save_dir + " already holds checkpoints (latest: " + *latest +
                        "); pass --resume auto to continue that run, or choose another directory");
  }
  if (!resume_dir.empty()) {
    resume = ckpt::read_manifest(resume_dir);
    const std::string why = ckpt::resume_mismatch(*resume, checkpoint_base(), cfg.resume_reset_data);
    if (!why.empty()) throw ConfigError("--resume " + resume_dir + ": " + why);
  }

  // Data: every model-parallel rank of a data-parallel replica reads the same batches (the
  // stages need the tokens, modality and targets; the loader is deterministic per dp rank).
  const int dp_rank = g.coord().dp;
  const bool keep_stream = resume && !cfg.resume_reset_data;
  if (cfg.data_sources.empty()) {
    if (cfg.val_fraction > 0) throw ConfigError("--val-fraction needs --data");
    synthetic_ = std::make_unique<SyntheticBatches>(cfg.model, cfg.data, cfg.seed + 1);
    if (keep_stream) synthetic_consumed_ = resume->state.consumed;
  } else {
    data::LoaderConfig lc;
    for (const std::string& s : cfg.data_sources) lc.sources.push_back(data::parse_data_source(s));
    lc.seed = cfg.seed;
    lc.micro_batch = cfg.data.batch_size;
    lc.dp_rank = dp_rank;
    lc.dp_size = dp_size();
    lc.global_batch = global_batch();
    lc.val_fraction = cfg.val_fraction;
    if (!cfg.tokenizer.empty()) lc.tokenizer_sha256 = data::sha256_file(cfg.tokenizer);
    lc.collate = {cfg.model.vision.tokens_per_image(), cfg.model.vision.image_size, cfg.data.seq_len, cfg.blank_images};
    const data::LoaderState at{resume ? resume->state.data_seed : 0, resume ? resume->state.blend_hash : 0,
                               resume ? resume->state.consumed : 0};
    try {
      loader_ = std::make_unique<data::DataLoader>(lc, keep_stream ? &at : nullptr);
    } catch (const std::invalid_argument& e) {
      throw ConfigError("--resume " + resume_dir + ": " + e.what() +
                        "; pass --resume-reset-data to keep the weights and optimizer and restart the data stream");
    }
  }
  if (resume) restore(resume_dir, *resume);
  else if (!cfg.init.empty()) init_weights(cfg.init);
  if (!cfg.save_dir.empty()) {
    // A run resumed from this directory keeps referring to the frozen set its checkpoint
    // names; anywhere else it writes its own at the first save.
    std::error_code ec;
    const bool same_dir = resume && !resume->frozen_dir.empty() &&
                          std::filesystem::equivalent(std::filesystem::path(resume_dir).parent_path(), cfg.save_dir, ec);
    saver_ = std::make_unique<ckpt::CheckpointSaver>(ckpt::SaveOptions{cfg.save_dir, cfg.save_every, cfg.keep_last, cfg.save_sync},
                                                     g, same_dir ? resume->frozen_dir : "",
                                                     same_dir ? resume->frozen_manifest_sha256 : "");
  }
  if (!cfg.metrics_file.empty() && is_root()) {
    metrics_.open(cfg.metrics_file, std::ios::app);
    if (!metrics_) throw ConfigError("--metrics '" + cfg.metrics_file + "': cannot open for writing");
  }
  if (!cfg.tensorboard_dir.empty() && is_root()) tensorboard_ = std::make_unique<TensorBoardWriter>(cfg.tensorboard_dir);
  // MFU's denominator: every rank's peak, summed (measured, so a slower node counts as such).
  peak_flops_ = cfg.peak_tflops > 0               ? cfg.peak_tflops * 1e12
                : cfg.device == Device::cuda ? gpu_peak_flops(cfg.precision)
                                             : measured_sgemm_peak();
  grid_->world().all_reduce_f64(&peak_flops_, 1, ReduceOp::sum);
}

int64_t Trainer::global_batch() const {
  return cfg_.global_batch ? cfg_.global_batch : cfg_.data.batch_size * cfg_.micro_batches * dp_size();
}

ckpt::Manifest Trainer::checkpoint_base() const {
  ckpt::Manifest m;
  m.kind = "step";
  m.step = step_;
  const GridShape& sh = grid_->shape();
  m.topology = {sh.size(), sh.tp, sh.dp, sh.pp, cfg_.zero_stage};
  m.state.step = step_;
  m.state.updates = opt_->updates();
  m.state.global_batch = global_batch();
  if (loader_) {
    const data::LoaderState ls = loader_->state();
    m.state.data = "prepared";
    m.state.data_seed = ls.seed;
    m.state.blend_hash = ls.blend_hash;
    m.state.consumed = ls.consumed;
  } else if (!cfg_.data_sources.empty()) {  // before the loader exists (the resume checks)
    m.state.data = "prepared";
    m.state.data_seed = cfg_.seed;
  } else {
    m.state.data = "synthetic";
    m.state.data_seed = cfg_.seed + 1;
    m.state.consumed = synthetic_consumed_;
  }
  m.model = nlohmann::json::parse(cfg_.model.to_json());
  m.run_config = cfg_.options;
  m.train_set = train_set_name(cfg_.model_options.train);
  m.attention = cfg_.model_options.attention == ops::AttnMode::mmca ? "mmca" : "causal";
  m.lora_rank = cfg_.model_options.train == TrainSet::lora ? cfg_.model_options.lora_rank : 0;
  return m;
}

void Trainer::restore(const std::string& dir, const ckpt::Manifest& m) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const ckpt::LoadStats st = ckpt::load_state(dir, m, opt_->state());
  opt_->refresh_working_copies();  // bf16: the layers read copies of what was loaded
  opt_->set_updates(m.state.updates);
  step_ = m.state.step;
  // Every rank read its own slices; the slowest decides when training can start.
  double bytes[2] = {static_cast<double>(st.bytes_read), static_cast<double>(st.bytes_verified)};
  grid_->world().all_reduce_f64(bytes, 2, ReduceOp::sum);
  if (is_root())
    std::printf("vchat-train | resumed from %s: step %lld, written under %s%s | read %.1f MB of tensors (%.1f MB of files verified) in %.2f s\n",
                dir.c_str(), static_cast<long long>(m.step), m.topology.describe().c_str(),
                cfg_.resume_reset_data ? ", data stream restarted" : "", bytes[0] / 1e6, bytes[1] / 1e6,
                std::chrono::duration<double>(clock::now() - t0).count());
}

void Trainer::init_weights(const std::string& dir) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const ckpt::Manifest m = ckpt::read_manifest(dir);
  // Its LoRA adapters would be dropped by a run without them: refuse, saying what works.
  if (m.train_set == "lora" && cfg_.model_options.train != TrainSet::lora)
    throw ConfigError("--init " + dir + ": trained with --train lora (rank " + std::to_string(m.lora_rank) +
                      "): its adapters would be lost; continue with --train lora --lora-rank " + std::to_string(m.lora_rank) +
                      ", or merge them first (vchat-ckpt export --lora merge, then vchat-ckpt import)");
  // LoRA adapters are the one thing a base model cannot hold: they keep their --seed values
  // (B = 0, so the model starts as the checkpoint's).
  const ckpt::InitReport r = ckpt::load_values(dir, m, opt_->state(), [](const Param& p) {
    return p.spec && p.spec->trained_by == kTrainLora;
  });
  opt_->refresh_working_copies();
  // A rank names only the adapters whose slices it holds (at ZeRO 2-3, and 1 under bf16,
  // its DP shard's), so the ranks add up: bytes read, and whether any adapter stayed.
  double sums[2] = {static_cast<double>(r.stats.bytes_read), r.kept.empty() ? 0.0 : 1.0};
  grid_->world().all_reduce_f64(sums, 2, ReduceOp::sum);
  const double bytes = sums[0];
  if (is_root())
    std::printf(
        "vchat-train | initialised from %s (step %lld, written under %s): %.1f MB of tensors read in %.2f s%s\n",
        dir.c_str(), static_cast<long long>(m.step), m.topology.describe().c_str(), bytes / 1e6,
        std::chrono::duration<double>(clock::now() - t0).count(),
        sums[1] > 0 ? "; the LoRA adapters start from --seed" : "");
}

std::vector<Batch> Trainer::next_batches() {
  if (loader_) return loader_->next_step().micro;
  if (fixed_) return *fixed_;
  // Synthetic: as the loader does, sample g of the global batch goes to replica g mod dp.
  const int64_t B = cfg_.data.batch_size, dp = dp_size();
  std::vector<Batch> batches;
  for (int64_t m = 0; m < cfg_.micro_batches; ++m) {
    std::vector<int64_t> samples;
    for (int64_t k = m * B; k < (m + 1) * B; ++k) samples.push_back(synthetic_consumed_ + k * dp + grid_->coord().dp);
    batches.push_back(synthetic_->batch(samples));
  }
  synthetic_consumed_ += global_batch();
  if (cfg_.fixed_batch) fixed_ = batches;
  return batches;
}

void Trainer::reset_comm_stats() {
  for (Comm* c : {&grid_->tp(), &grid_->dp(), &grid_->pp(), &grid_->mp(), model_->kv_replicas()})
    if (c) c->reset_stats();
}

StepStats Trainer::step() {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  StepStats s;
  Comm &tp = grid_->tp(), &dp = grid_->dp(), &pp = grid_->pp(), &mp = grid_->mp();
  reset_comm_stats();

  // 1. This replica's micro-batches of the step (the same on all its model-parallel ranks).
  //    Checked here, on the host, before any compute: a bad record is named, not computed.
  const std::vector<Batch> batches = next_batches();
  const int M = static_cast<int>(batches.size());
  for (const Batch& b : batches) b.validate(cfg_.model.llm.vocab_size, cfg_.model.vision.image_size);
  // The model's copies, where it runs: on a GPU their copies start now, on a stream of their
  // own, and each micro-batch's forward waits only for its own (device_batches.h).
  const std::vector<Batch>& on_device = device_batches_->upload(batches);

  // 2. The step loss is the mean CE over every supervised token of the global batch, so
  //    each micro-batch's summed loss is divided by the global count (one scalar
  //    all-reduce): the result does not depend on how samples fall into micro-batches/ranks.
  double counts[4] = {0, 0, 0, 0};  // supervised tokens, non-pad tokens, rows, images (for FLOPs)
  for (const Batch& b : batches) {
    counts[0] += static_cast<double>(b.supervised_count());
    counts[1] += static_cast<double>(b.non_pad_count());
    counts[2] += static_cast<double>(b.batch_size() * b.seq_len());
    counts[3] += static_cast<double>(b.n_images());
    s.rows += b.batch_size() * b.seq_len();
    s.images.push_back(b.n_images());
  }
  if (dp.size() > 1) dp.all_reduce_f64(counts, 4, ReduceOp::sum);
  const int64_t global_supervised = std::max<int64_t>(1, static_cast<int64_t>(counts[0]));
  const float loss_scale = 1.f / static_cast<float>(global_supervised);

  // 3. Forward + backward of every micro-batch through this rank's pipeline stage, in the
  //    1F1B order (with one stage: forward then backward of each). Gradients accumulate; so
  //    does the loss, where the model runs (the step's scalars: [loss sum, gradient sum of
  //    squares], read back in one copy at the end, so a GPU never waits on the host mid-step).
  if (zero01_) zero01_->set_micro_batches(M);
  opt_->zero_grads();
  const Tensor scalars = Tensor::zeros({2}, DType::f32, cfg_.device);
  const Tensor loss_sum = scalars.slice(0, 0, 1), grad_sq = scalars.slice(0, 1, 2);
  PipelineStage stage;
  stage.forward = [&](int mb, const Tensor& input) {
    device_batches_->ready(mb);
    return model_->stage_forward(mb, on_device[mb], input, /*backward_follows=*/true, nullptr, false, loss_sum);
  };
  stage.backward = [&](int mb, const Tensor& doutput) {
    return model_->stage_backward(mb, on_device[mb], doutput, loss_scale);
  };
  run_1f1b(pp, M, stage, {cfg_.device, model_->compute_dtype()});

  // 4. The loss lives on the last stage: sum over stages (others add 0), then replicas.
  if (pp.size() > 1) pp.all_reduce(loss_sum, ReduceOp::sum);
  if (dp.size() > 1) dp.all_reduce(loss_sum, ReduceOp::sum);
  s.tokens = static_cast<int64_t>(counts[1]);

  // 5. ZeRO: reduce the gradients over the DP group (each is already divided by the global
  //    count), clip by the global norm over all groups, update (this rank's shard from
  //    stage 1), and bring the weights back (stages 1-2; stage 3 gathers on use; stages
  //    2-3 reduced each unit's gradients in its backward already).
  //    A step without a supervised token (every answer cut away by --seq-len) carries no
  //    signal: no update at all (Adam's momentum would still move the weights); the step
  //    line says so.
  s.lr = cfg_.lr.at(step_);
  s.supervised = static_cast<int64_t>(counts[0]);
  if (saver_ && saver_->in_flight()) {  // a save in flight may still be copying the state
    const auto w0 = clock::now();
    saver_->wait_snapshot();
    save_blocked_ += std::chrono::duration<double>(clock::now() - w0).count();
  }
  if (s.supervised > 0) opt_->update(s.lr, grad_sq);

  // 6. The one copy back: the loss and the gradient norm (this waits for the step's device
  //    work, so the step's time includes it). A diverged step changed nothing; say so.
  const std::vector<float> back = scalars.to_vector_f32();
  s.loss = back[0] / static_cast<double>(global_supervised);
  s.grad_norm = gradient_norm(back[1], opt_->updates());
  synchronize(cfg_.device);
  s.step = ++step_;
  s.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  s.model_flops = step_flops(cfg_.model, cfg_.model_options, static_cast<int64_t>(counts[2]), cfg_.data.seq_len,
                             static_cast<int64_t>(counts[3])).total();
  s.mfu = s.model_flops / (s.seconds * peak_flops_);
  for (Comm* c : {&tp, &dp, &pp, &mp, model_->kv_replicas()})
    if (c) c->collect_device_time();  // what finished on the GPU (the step's work has)
  // Replicated KV heads sum their gradients on a sub-group of TP: tensor-parallel traffic.
  const CommStats kv = model_->kv_replicas() ? model_->kv_replicas()->stats() : CommStats{};
  s.comm_seconds = tp.stats().seconds + kv.seconds + dp.stats().seconds + mp.stats().seconds;
  s.bubble_seconds = pp.stats().seconds;
  s.comm_device_seconds =
      tp.stats().device_seconds + kv.device_seconds + dp.stats().device_seconds + mp.stats().device_seconds;
  s.pp_device_seconds = pp.stats().device_seconds;
  s.comm_bytes = dp.stats().bytes;
  s.tp_bytes = tp.stats().bytes + kv.bytes;
  s.pp_bytes = pp.stats().bytes;
  return s;
}

EvalStats Trainer::evaluate() {
  EvalStats e;
  if (!loader_) return e;
  const std::vector<Batch>& vb = loader_->validation();
  for (const Batch& b : vb) b.validate(cfg_.model.llm.vocab_size, cfg_.model.vision.image_size);
  // ZeRO-3 gathers each layer's weights from the DP group as the forward reaches it, so
  // every replica must run as many micro-batches as the one with the most; a replica with
  // fewer runs a filler batch whose results are dropped. (Gathering the whole model once
  // instead would need the memory ZeRO-3 exists to save.)
  int micro = static_cast<int>(vb.size());
  if (zero3_ && !zero3_->resident() && grid_->dp().size() > 1) {
    double most = micro;
    grid_->dp().all_reduce_f64(&most, 1, ReduceOp::max);
    micro = static_cast<int>(most);
  }
  const int64_t L = 8;
  const Batch filler = !vb.empty() ? vb.front()
                                   : Batch::from_rows(1, L, std::vector<int32_t>(L, 0), std::vector<uint8_t>(L, ops::kText),
                                                      std::vector<uint8_t>(L, 0), {}, 0, cfg_.model.vision.image_size);
  double sums[4] = {0, 0, 0, 0};  // loss sum, tokens, answers, exact answers
  auto forward = [&](int mb, const Tensor& input) {
    const bool real = mb < static_cast<int>(vb.size());
    const Batch& b = real ? vb[mb] : filler;
    MicroBatchResult r;
    Tensor out = model_->stage_forward(mb, b.to(cfg_.device), input, /*backward_follows=*/false, &r, /*keep_logits=*/true);
    if (!model_->last_stage() || !real) return out;
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
    return out;
  };
  if (micro > 0) run_forward_only(grid_->pp(), micro, forward, {cfg_.device, model_->compute_dtype()});
  if (grid_->pp().size() > 1) grid_->pp().all_reduce_f64(sums, 4, ReduceOp::sum);
  if (grid_->dp().size() > 1) grid_->dp().all_reduce_f64(sums, 4, ReduceOp::sum);
  e.loss = sums[1] > 0 ? sums[0] / sums[1] : 0;
  e.tokens = static_cast<int64_t>(sums[1]);
  e.answers = static_cast<int64_t>(sums[2]);
  e.answers_exact = static_cast<int64_t>(sums[3]);
  return e;
}

// This process's peak resident set (bytes): host memory on CPU runs.
static double peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) * 1024.0;  // Linux reports KiB
}

Trainer::Agreement Trainer::agree() {
  const bool time_up = cfg_.exit_after_minutes > 0 &&
                       std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count() >=
                           cfg_.exit_after_minutes * 60;
  const bool enough = cfg_.exit_after_steps > 0 && step_ - first_step_ >= cfg_.exit_after_steps;
  const bool writing = saver_ && saver_->in_flight() && saver_->local_status() == ckpt::CheckpointSaver::writing;
  const double limit = time_up ? 1.0 : enough ? 2.0 : 0.0;
  double flags[5] = {static_cast<double>(StopSignals::requested()), limit, writing ? 1.0 : 0.0, peak_rss_bytes(),
                     cfg_.device == Device::cuda ? gpu_memory_peak_in_use() : 0.0};
  grid_->world().all_reduce_f64(flags, 5, ReduceOp::max);
  Agreement a;
  a.peak_memory = flags[3];
  a.peak_gpu_memory = flags[4];
  if (flags[0] > 0) {
    a.stop = true;
    a.why = StopSignals::name(static_cast<int>(flags[0]));
  } else if (flags[1] > 0) {
    a.stop = true;
    char why[96];
    if (flags[1] == 1) std::snprintf(why, sizeof why, "--exit-after-minutes %g", cfg_.exit_after_minutes);
    else std::snprintf(why, sizeof why, "--exit-after-steps %lld", static_cast<long long>(cfg_.exit_after_steps));
    a.why = why;
  }
  a.save_ready = saver_ && saver_->in_flight() && flags[2] == 0;
  return a;
}

std::string Trainer::save_now() {
  start_save();
  return finish_save();
}

void Trainer::start_save() {
  const auto t0 = std::chrono::steady_clock::now();
  saver_->start(opt_->state(), checkpoint_base());
  save_blocked_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string Trainer::finish_save() {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string dir = saver_->finish();
  save_blocked_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return dir;
}

void Trainer::report_saved(const std::string& dir) {
  const double blocked = std::exchange(save_blocked_, 0.0);
  if (!is_root() || dir.empty()) return;
  const ckpt::CheckpointSaver::Timing& t = saver_->last_timing();
  std::printf("checkpoint | step %lld | %s | training blocked %.0f ms%s | rank 0: snapshot %.0f ms, wrote %.1f MB in %.2f s (%.0f MB/s), SHA-256 %.2f s\n",
              static_cast<long long>(t.step), dir.c_str(), blocked * 1e3, cfg_.save_sync ? " (--save-sync)" : "",
              t.snapshot_seconds * 1e3, t.bytes / 1e6, t.write_seconds, t.bytes / 1e6 / std::max(t.write_seconds, 1e-9),
              t.hash_seconds);
  std::fflush(stdout);
  if (metrics_.is_open())
    metrics_ << nlohmann::json{{"checkpoint", dir},          {"step", t.step},
                               {"blocked_seconds", blocked}, {"snapshot_seconds", t.snapshot_seconds},
                               {"write_seconds", t.write_seconds}, {"hash_seconds", t.hash_seconds},
                               {"bytes_rank0", t.bytes}}
                    .dump()
             << "\n" << std::flush;
}

void Trainer::run() {
  // From here on a stop request saves first (before, the default action ends the process:
  // there is nothing to save yet, and a failing peer's SIGTERM from mpirun must still work).
  StopSignals::install();
  const ParamStore& ps = model_->params();
  if (is_root())
    std::printf(
        "vchat-train | model %s | train %s | attention %s | params on rank 0 %.2fM (trainable %.2fM) | tp %d dp %d pp "
        "%d | zero %d%s | threads %d | data %s\n",
        cfg_.model.name.c_str(), train_set_name(cfg_.model_options.train),
        cfg_.model_options.attention == ops::AttnMode::mmca ? "mmca" : "causal", ps.numel(false) / 1e6,
        ps.numel(true) / 1e6, grid_->shape().tp, dp_size(), grid_->shape().pp, opt_->stage(),
        zero01_ || (zero3_ && dp_size() > 1) ? " (gradients reduced during backward)" : "", omp_get_max_threads(),
        loader_ ? (std::to_string(cfg_.data_sources.size()) + " dataset(s), " +
                   std::to_string(loader_->validation_samples()) + " held out")
                      .c_str()
                : "synthetic");
  auto report_eval = [&](const char* when) {
    const EvalStats e = evaluate();
    if (is_root())
      std::printf("validation %s | step %lld | loss %.4f | answer accuracy %.4f (%lld/%lld, teacher-forced exact match)\n",
                  when, static_cast<long long>(step_), e.loss, e.accuracy(), static_cast<long long>(e.answers_exact),
                  static_cast<long long>(e.answers));
    std::fflush(stdout);
    if (metrics_.is_open())
      metrics_ << nlohmann::json{{"validation", when}, {"step", step_}, {"loss", e.loss}, {"tokens", e.tokens},
                                 {"answers", e.answers}, {"answers_exact", e.answers_exact}}
                      .dump()
               << "\n" << std::flush;
    if (tensorboard_) {
      tensorboard_->scalar("validation/loss", e.loss, step_);
      tensorboard_->scalar("validation/answer_accuracy", e.accuracy(), step_);
      tensorboard_->flush();
    }
  };
  double elapsed = 0;
  const int64_t first = first_step_ = step_;  // > 0 when resumed
  std::string stopped_by;
  while (step_ < cfg_.steps) {
    const StepStats s = step();
    elapsed += s.seconds;
    // A run whose first steps all lost every supervised token trains nothing at all.
    if (s.step - first <= kSupervisionGraceSteps && s.supervised == 0 && ++unsupervised_steps_ == kSupervisionGraceSteps)
      throw ConfigError("none of the first " + std::to_string(kSupervisionGraceSteps) +
                        " steps had a supervised token: every answer lies beyond --seq-len=" +
                        std::to_string(cfg_.data.seq_len) + " tokens (images count too); raise --seq-len");
    // After every step, one agreement over the world: a stop request on any rank, whether
    // the save in flight is written everywhere (then it is published), the peak memory.
    const Agreement a = agree();
    if (is_root() && (s.step % cfg_.log_every == 0 || s.step == cfg_.steps || s.supervised == 0)) {
      const double eta = elapsed / static_cast<double>(s.step - first) * static_cast<double>(cfg_.steps - s.step);
      // On NCCL the host barely waits for collectives: their GPU time, beside the split.
      char gpu_comm[96] = "";
      if (s.comm_device_seconds + s.pp_device_seconds > 0)
        std::snprintf(gpu_comm, sizeof gpu_comm, " [on GPU streams: comm %.0f, p2p %.0f]", s.comm_device_seconds * 1e3,
                      s.pp_device_seconds * 1e3);
      // On a GPU, its memory beside the host's: the one a run runs out of.
      char mem[96];
      if (cfg_.device == Device::cuda)
        std::snprintf(mem, sizeof mem, "%.2f GB host, %.2f GB GPU", a.peak_memory / 1e9, a.peak_gpu_memory / 1e9);
      else
        std::snprintf(mem, sizeof mem, "%.2f GB", a.peak_memory / 1e9);
      std::printf(
          "step %5lld/%lld | loss %.4f | lr %.3e | grad norm %.4f | %.0f tok/s | MFU %.1f%% | %.0f ms (compute %.0f, "
          "comm %.0f, bubble %.0f)%s | mem %s | eta %.0fs%s\n",
          static_cast<long long>(s.step), static_cast<long long>(cfg_.steps), s.loss, s.lr, s.grad_norm,
          s.tokens / s.seconds, s.mfu * 100, s.seconds * 1e3, (s.seconds - s.comm_seconds - s.bubble_seconds) * 1e3,
          s.comm_seconds * 1e3, s.bubble_seconds * 1e3, gpu_comm, mem, eta,
          s.supervised == 0 ? " | no supervised token in this step (answers cut off by --seq-len?): no update" : "");
      std::fflush(stdout);
    }
    if (metrics_.is_open()) {
      const ZeroMemory mem = opt_->memory();
      nlohmann::json j = {{"step", s.step},
                          {"loss", s.loss},
                          {"lr", s.lr},
                          {"grad_norm", s.grad_norm},
                          {"tokens", s.tokens},
                          {"supervised", s.supervised},
                          {"rows", s.rows},
                          {"images", s.images},
                          {"seconds", s.seconds},
                          {"tokens_per_second", s.tokens / s.seconds},
                          {"model_flops", s.model_flops},
                          {"mfu", s.mfu},
                          {"peak_memory_bytes", a.peak_memory},
                          {"comm_seconds", s.comm_seconds},
                          {"bubble_seconds", s.bubble_seconds},
                          {"comm_device_seconds", s.comm_device_seconds},
                          {"pp_device_seconds", s.pp_device_seconds},
                          {"comm_bytes", s.comm_bytes},
                          {"tp_bytes", s.tp_bytes},
                          {"pp_bytes", s.pp_bytes},
                          {"trained_bytes", model_->params().numel(true) * 4},
                          {"frozen_bytes", (model_->params().numel(false) - model_->params().numel(true)) * 4},
                          {"mem_params", mem.params},
                          {"mem_frozen", mem.frozen},
                          {"mem_grads", mem.grads},
                          {"mem_optimizer", mem.optimizer}};
      if (cfg_.device == Device::cuda) j["peak_gpu_memory_bytes"] = a.peak_gpu_memory;
      metrics_ << j.dump() << "\n" << std::flush;
    }
    if (tensorboard_) {
      tensorboard_->scalar("train/loss", s.loss, s.step);
      tensorboard_->scalar("train/lr", s.lr, s.step);
      tensorboard_->scalar("train/grad_norm", s.grad_norm, s.step);
      tensorboard_->scalar("train/tokens_per_second", s.tokens / s.seconds, s.step);
      tensorboard_->scalar("train/mfu", s.mfu, s.step);
      tensorboard_->scalar("train/peak_memory_gb", a.peak_memory / 1e9, s.step);
      if (cfg_.device == Device::cuda)
        tensorboard_->scalar("train/peak_gpu_memory_gb", a.peak_gpu_memory / 1e9, s.step);
      tensorboard_->flush();
    }
    if (a.save_ready) report_saved(finish_save());
    if (a.stop) {
      stopped_by = a.why;
      break;
    }
    if (saver_ && cfg_.save_every > 0 && step_ % cfg_.save_every == 0 && step_ < cfg_.steps) {
      start_save();
      if (cfg_.save_sync) report_saved(finish_save());
    }
    if (loader_ && loader_->validation_samples() > 0 && cfg_.val_every > 0 && s.step % cfg_.val_every == 0 &&
        s.step != cfg_.steps)
      report_eval("periodic");
  }
  // The end, or a stop: the last checkpoint (blocking), before anything else can fail.
  if (saver_ && step_ > first) report_saved(save_now());  // (resumed at the end: already saved)
  if (!stopped_by.empty()) {
    if (is_root()) {
      std::printf("vchat-train | stopped after step %lld/%lld by %s: %s\n", static_cast<long long>(step_),
                  static_cast<long long>(cfg_.steps), stopped_by.c_str(),
                  saver_ ? ("saved; continue with --resume auto --save-dir " + cfg_.save_dir).c_str()
                         : "nothing saved (no --save-dir)");
      std::fflush(stdout);
    }
    return;
  }
  if (loader_ && loader_->validation_samples() > 0) report_eval("final");
}

}  // namespace vchat
