#include "train/train_config.h"

#include <boost/program_options.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "checkpoint/manifest.h"
#include "parallel/zero.h"

namespace vchat {

namespace po = boost::program_options;

namespace {
// Every option's final value as JSON (what a checkpoint records of the run).
nlohmann::json options_json(const po::variables_map& vm) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [name, v] : vm) {
    const boost::any& a = v.value();
    if (auto* s = boost::any_cast<std::string>(&a)) j[name] = *s;
    else if (auto* i = boost::any_cast<int>(&a)) j[name] = *i;
    else if (auto* l = boost::any_cast<int64_t>(&a)) j[name] = *l;
    else if (auto* u = boost::any_cast<uint64_t>(&a)) j[name] = *u;
    else if (auto* f = boost::any_cast<float>(&a)) j[name] = *f;
    else if (auto* d = boost::any_cast<double>(&a)) j[name] = *d;
    else if (auto* b = boost::any_cast<bool>(&a)) j[name] = *b;
    else if (auto* vs = boost::any_cast<std::vector<std::string>>(&a)) j[name] = *vs;
    else j[name] = nullptr;  // a type added later: recorded by name
  }
  return j;
}

template <class T>
void require_positive(const char* opt, T v) {
  if (v <= 0) throw ConfigError(std::string("--") + opt + "=" + std::to_string(v) + " must be positive");
}
}  // namespace

bool parse_train_config(int argc, const char* const argv[], TrainConfig& c) {
  std::string train = "default", attention = "mmca", recompute = "none", device = "auto", precision = "auto",
              attention_backward = "deterministic";
  po::options_description general("vchat-train options");
  // clang-format off
  general.add_options()
    ("help,h", "show this help")
    ("config", po::value(&c.config_file), "INI file with any of these options (command line wins)")
    ("model", po::value(&c.model_file)->default_value("inputs/models/tiny.json"), "model config JSON (inputs/models/)")
    ("train", po::value(&train)->default_value("default"), "what trains: default (projection + embedding, the paper), lora, full")
    ("lora-rank", po::value(&c.model_options.lora_rank)->default_value(8), "LoRA rank r")
    ("lora-alpha", po::value(&c.model_options.lora_alpha)->default_value(16.f), "LoRA alpha (scale = alpha/r)")
    ("attention", po::value(&attention)->default_value("mmca"), "mmca (multi-modal causal) or causal (baseline)")
    ("device", po::value(&device)->default_value("auto"), "where the step runs: cpu, cuda (one GPU per rank), or auto (cuda when this build has CUDA and a GPU is visible)")
    ("precision", po::value(&precision)->default_value("auto"), "compute precision on cuda: bf16 (fp32 master weights, gradients, Adam state) or fp32; auto: bf16 on cuda, fp32 on cpu")
    ("comm", po::value(&c.comm)->default_value("auto"), "collectives of a --device cuda run: nccl (one GPU per rank), mpi (device buffers staged through the host: any layout, several ranks may share a GPU), or auto (nccl unless two ranks share a GPU)")
    ("attention-backward", po::value(&attention_backward)->default_value("deterministic"), "bf16 flash attention's backward on cuda: deterministic (dQ in a pass of its own; the same bits every run) or atomic-dq (dQ added up by atomics in the dK/dV pass, as FlashAttention-2 does: one pass fewer over the L x L tiles; dQ's last bits vary from run to run)")
    ("recompute", po::value(&recompute)->default_value("none"), "decoder activations: none (keep all for backward) or block (keep each block's input, recompute the rest in backward: less memory, one more forward)")
    ("steps", po::value(&c.steps)->default_value(10), "optimizer steps")
    ("micro-batch-size", po::value(&c.data.batch_size)->default_value(2), "samples per micro-batch")
    ("micro-batches", po::value(&c.micro_batches)->default_value(1), "micro-batches per step and data-parallel replica (gradient accumulation; the 1F1B pipeline's M, >= pp); with --data, --global-batch sets it")
    ("seq-len", po::value(&c.data.seq_len)->default_value(256), "tokens per sample (image tokens included)")
    ("max-images", po::value(&c.data.max_images)->default_value(3), "synthetic data: images per sample, at most")
    ("max-rounds", po::value(&c.data.max_rounds)->default_value(3), "synthetic data: rounds per sample, at most")
    ("fixed-batch", po::bool_switch(&c.fixed_batch), "reuse the first batch every step (overfitting check)")
    ("lr", po::value(&c.lr.max_lr)->default_value(1e-3f), "peak learning rate")
    ("min-lr", po::value(&c.lr.min_lr)->default_value(1e-5f), "learning rate at the end of the cosine")
    ("warmup", po::value(&c.lr.warmup_steps)->default_value(0), "linear warmup steps")
    ("weight-decay", po::value(&c.adamw.weight_decay)->default_value(0.f), "AdamW decoupled weight decay (matrices only)")
    ("beta1", po::value(&c.adamw.beta1)->default_value(0.9f), "AdamW beta1")
    ("beta2", po::value(&c.adamw.beta2)->default_value(0.95f), "AdamW beta2")
    ("adam-eps", po::value(&c.adamw.eps)->default_value(1e-8f), "AdamW epsilon")
    ("clip-grad", po::value(&c.adamw.clip_grad)->default_value(1.f), "clip by global grad norm (<= 0: off)")
    ("seed", po::value(&c.seed)->default_value(1234), "seed for weights and synthetic data")
    ("threads", po::value(&c.threads)->default_value(0), "CPU threads for OpenMP and OpenBLAS (0: library default)")
    ("log-every", po::value(&c.log_every)->default_value(1), "print a step line every N steps")
    ("metrics", po::value(&c.metrics_file), "append one JSON line per step to this file")
    ("tensorboard", po::value(&c.tensorboard_dir), "write TensorBoard event files (loss, lr, grad norm, throughput, MFU, validation) into this directory")
    ("peak-tflops", po::value(&c.peak_tflops)->default_value(0.0), "peak TFLOP/s of one rank's device, for MFU (0: on cuda the data sheet's dense figure of an A100 or H100 per SM times the GPU's SMs; on cpu the fp32 GEMM measured at start)")
    ("data", po::value(&c.data_sources)->composing(), "prepared dataset name=path[:weight]; repeatable (blended by weight)")
    ("global-batch", po::value(&c.global_batch)->default_value(0), "samples per step over all ranks (0: micro-batch-size x micro-batches x dp)")
    ("val-fraction", po::value(&c.val_fraction)->default_value(0.0), "fraction of each dataset held out for validation")
    ("val-every", po::value(&c.val_every)->default_value(0), "steps between validation passes (0: at the end only)")
    ("tokenizer", po::value(&c.tokenizer), "sentencepiece model; its SHA-256 must match the shards'")
    ("blank-images", po::bool_switch(&c.blank_images), "replace every image by the mean colour (ablation)")
    ("tp", po::value(&c.tp)->default_value(1), "tensor-parallel ranks, neighbours in the world (world = tp x dp x pp; dp is inferred)")
    ("pp", po::value(&c.pp)->default_value(1), "pipeline stages (contiguous layer ranges, 1F1B schedule)")
    ("comm-timeout", po::value(&c.comm_timeout)->default_value(600.0), "seconds before a stuck collective or send/recv aborts the job, naming it (0: never)")
    ("zero", po::value(&c.zero_stage)->default_value(0), "ZeRO stage over the data-parallel ranks: 0, 1 (shard optimizer state), 2 (and gradients and fp32 master weights; each layer's gradient reduced in its backward), 3 (and weights, gathered per layer)")
    ("overlap-grad-reduce", po::value(&c.overlap_grad_reduce)->default_value("auto"), "ZeRO 0-1 over several replicas: on (reduce each unit's gradients as soon as its backward is done, under the backward of the next), off (one reduction after backward), or auto (on when the data-parallel collectives run beside compute: NCCL). ZeRO 2-3 always reduce in backward: it is how they give each gradient up")
    ("save-dir", po::value(&c.save_dir), "write checkpoints under this directory (step_XXXXXXXX/ per save, `latest`)")
    ("save-every", po::value(&c.save_every)->default_value(0), "steps between checkpoints (0: only at the end and when stopped by a signal or the clock)")
    ("keep-last", po::value(&c.keep_last)->default_value(0), "checkpoints to keep (0: all); older ones go once a newer one is published")
    ("save-sync", po::bool_switch(&c.save_sync), "write checkpoints in the step loop instead of on a background thread")
    ("resume", po::value(&c.resume), "auto (the latest checkpoint in --save-dir, or a fresh start) or a checkpoint / save directory")
    ("init", po::value(&c.init), "start from the weights of this checkpoint (vchat-ckpt import's output, or any checkpoint of any layout): step 0, a fresh optimizer and data stream; its model config unless --model is given (they must then agree). With --resume auto, a run that has checkpoints resumes instead")
    ("resume-reset-data", po::bool_switch(&c.resume_reset_data), "with --resume: keep weights, optimizer and step, restart the data stream (allows another --global-batch or --data)")
    ("exit-after-minutes", po::value(&c.exit_after_minutes)->default_value(0.0), "stop after the step running at this many minutes, save, exit 0 (0: never)")
    ("exit-after-steps", po::value(&c.exit_after_steps)->default_value(0), "stop after this many steps of this run, save, exit 0 (0: never); the LR schedule still spans --steps");
  // clang-format on

  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, general), vm);
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      std::ifstream f(path);
      if (!f) throw ConfigError("--config '" + path + "': cannot open the INI file (no such file or not readable)");
      po::store(po::parse_config_file(f, general), vm);
    }
    po::notify(vm);
  } catch (const po::unknown_option& e) {
    throw ConfigError("unknown option '" + e.get_option_name() + "' (see --help)");
  } catch (const po::invalid_option_value& e) {
    throw ConfigError(std::string(e.what()));
  } catch (const po::error& e) {
    throw ConfigError(std::string(e.what()) + " (see --help)");
  }
  if (vm.count("help")) {
    std::cout << "usage: vchat-train [--config FILE.ini] [options]\n\n" << general << "\n";
    return false;
  }
  auto bad = [](const std::string& opt, double v, const char* why) {
    std::ostringstream o;
    o << "--" << opt << "=" << v << " " << why;
    return ConfigError(o.str());
  };
  c.model_options.train = parse_train_set(train);
  c.model_options.attention = parse_attention(attention);
  c.model_options.recompute = parse_recompute(recompute);
  // (Counting GPUs starts the CUDA runtime: not for --device cpu.)
  c.device = resolve_device(device, built_with_cuda(), device == "cpu" ? 0 : visible_gpus());
  c.precision = resolve_precision(precision, c.device);
  if (c.comm != "auto" && c.comm != "mpi" && c.comm != "nccl")
    throw ConfigError("--comm=" + c.comm + " is not one of: auto, mpi, nccl");
  if (c.comm == "nccl" && c.device != Device::cuda) throw ConfigError("--comm=nccl needs --device cuda");
  c.deterministic_attention = resolve_deterministic_attention(attention_backward, c.device);
  require_positive("steps", c.steps);
  require_positive("micro-batch-size", c.data.batch_size);
  require_positive("micro-batches", c.micro_batches);
  require_positive("seq-len", c.data.seq_len);
  require_positive("max-images", c.data.max_images);
  require_positive("max-rounds", c.data.max_rounds);
  require_positive("lora-rank", c.model_options.lora_rank);
  require_positive("log-every", c.log_every);
  if (c.data.max_images > 8) throw ConfigError("--max-images=" + std::to_string(c.data.max_images) + " exceeds the template's 8 images per sample");
  if (c.global_batch < 0) throw ConfigError("--global-batch=" + std::to_string(c.global_batch) + " must be >= 0");
  if (!(c.val_fraction >= 0 && c.val_fraction < 1)) throw bad("val-fraction", c.val_fraction, "must be in [0, 1)");
  if (c.val_every < 0) throw bad("val-every", c.val_every, "must be >= 0");
  if (!c.tokenizer.empty() && !std::filesystem::exists(c.tokenizer))
    throw ConfigError("--tokenizer '" + c.tokenizer + "': no such file");
  check_zero_stage(c.zero_stage);
  if (c.overlap_grad_reduce != "auto" && c.overlap_grad_reduce != "on" && c.overlap_grad_reduce != "off")
    throw ConfigError("--overlap-grad-reduce=" + c.overlap_grad_reduce + " is not one of: auto, on, off");
  if (c.overlap_grad_reduce == "off" && c.zero_stage >= 2)
    throw ConfigError("--overlap-grad-reduce=off with --zero " + std::to_string(c.zero_stage) +
                      ": ZeRO 2-3 reduce each layer's gradient in its backward (so that no rank holds the whole "
                      "gradient); use --zero 1 to reduce once after backward");
  if (!(c.comm_timeout >= 0)) throw bad("comm-timeout", c.comm_timeout, "must be >= 0");
  if (c.threads < 0) throw ConfigError("--threads=" + std::to_string(c.threads) + " must be >= 0");
  if (!(c.lr.max_lr > 0)) throw bad("lr", c.lr.max_lr, "must be positive");
  if (!(c.lr.min_lr >= 0 && c.lr.min_lr <= c.lr.max_lr)) throw bad("min-lr", c.lr.min_lr, "must be in [0, --lr]");
  if (c.lr.warmup_steps < 0) throw bad("warmup", c.lr.warmup_steps, "must be >= 0");
  if (!(c.adamw.beta1 >= 0 && c.adamw.beta1 < 1)) throw bad("beta1", c.adamw.beta1, "must be in [0, 1)");
  if (!(c.adamw.beta2 >= 0 && c.adamw.beta2 < 1)) throw bad("beta2", c.adamw.beta2, "must be in [0, 1)");
  if (!(c.adamw.eps > 0)) throw bad("adam-eps", c.adamw.eps, "must be positive");
  if (!(c.adamw.weight_decay >= 0)) throw bad("weight-decay", c.adamw.weight_decay, "must be >= 0");
  if (!(c.model_options.lora_alpha > 0)) throw bad("lora-alpha", c.model_options.lora_alpha, "must be positive");
  if (c.save_every < 0) throw ConfigError("--save-every=" + std::to_string(c.save_every) + " must be >= 0");
  if (c.keep_last < 0) throw ConfigError("--keep-last=" + std::to_string(c.keep_last) + " must be >= 0");
  if (!(c.peak_tflops >= 0)) throw bad("peak-tflops", c.peak_tflops, "must be >= 0");
  if (!(c.exit_after_minutes >= 0)) throw bad("exit-after-minutes", c.exit_after_minutes, "must be >= 0");
  if (c.exit_after_steps < 0) throw ConfigError("--exit-after-steps=" + std::to_string(c.exit_after_steps) + " must be >= 0");
  if (c.save_dir.empty() && (c.save_every > 0 || c.keep_last > 0 || c.resume == "auto"))
    throw ConfigError(std::string(c.resume == "auto" ? "--resume auto" : c.save_every > 0 ? "--save-every" : "--keep-last") +
                      " needs --save-dir");
  if (c.resume_reset_data && c.resume.empty()) throw ConfigError("--resume-reset-data needs --resume");
  c.options = options_json(vm);
  c.lr.total_steps = c.steps;
  if (!c.init.empty()) {
    if (!c.resume.empty() && c.resume != "auto")
      throw ConfigError("--init and --resume " + c.resume + " exclude each other (--resume auto with --init resumes a run that has checkpoints, and starts from --init otherwise)");
    // A run that already has checkpoints resumes from them: --init only seeded its first start
    // (and may be gone by now); the model config then comes from its latest checkpoint.
    const auto latest = c.resume == "auto" ? ckpt::latest_checkpoint(c.save_dir) : std::nullopt;
    if (latest) c.init.clear();
    const std::string source = latest ? *latest : ckpt::resolve_checkpoint(c.init, "--init");
    if (!latest) c.init = source;
    const ckpt::Manifest m = ckpt::read_manifest(source);
    const ModelConfig theirs = ModelConfig::from_json_text(m.model.dump(), source + "/manifest.json");
    if (vm["model"].defaulted()) {
      c.model = theirs;
      c.model_file = source + "/manifest.json";
    } else {
      c.model = ModelConfig::load(c.model_file);
      nlohmann::json a = nlohmann::json::parse(theirs.to_json()), b = nlohmann::json::parse(c.model.to_json());
      a.erase("name"), b.erase("name");
      const std::string d = ckpt::first_difference(a, b, "model");
      if (!d.empty()) throw ConfigError("--init " + source + ": written for another model than --model " + c.model_file + " (" + d + ")");
    }
  } else {
    c.model = ModelConfig::load(c.model_file);
  }
  const int64_t t_img = c.model.vision.tokens_per_image();
  if (c.data.seq_len < t_img + 16)
    throw ConfigError("--seq-len=" + std::to_string(c.data.seq_len) + " cannot hold one image of " + std::to_string(t_img) +
                      " tokens plus text (model '" + c.model_file + "'); use at least " + std::to_string(t_img + 16));
  if (c.data.seq_len > c.model.llm.max_seq_len)
    throw ConfigError("--seq-len=" + std::to_string(c.data.seq_len) + " exceeds llm.max_seq_len=" +
                      std::to_string(c.model.llm.max_seq_len) + " of '" + c.model_file + "'");
  return true;
}

}  // namespace vchat
