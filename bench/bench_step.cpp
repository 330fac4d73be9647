// One training step of a model config: vchat's time (and MFU), with the batch written out
// so bench/torch_step.py (CPU) or bench/gpu_torch_step.py (GPU) times the same model and
// batch in PyTorch in the same run.
//   vchat-bench-step --model inputs/models/small.json --batch 2 --seq-len 512 --threads 2
//                    --batch-out /tmp/batch.safetensors
//   vchat-bench-step --device cuda --precision bf16 --model inputs/models/llama-1b-clip-l14-224.json
//                    --train full --batch 4 --seq-len 2048 --images 4 --recompute none [--profile]
// --profile: one more step after the timed ones with the op profiler on (src/profile.h), its
// table of time per op printed as '#' lines after the result line (on a GPU with each op's
// roofline). --attention-backward atomic-dq: as vchat-train's (cuda: dQ added up in the dK/dV
// pass). --micro-batches K: each step accumulates the gradients of K forward and backward
// passes over the batch before its one update, as training with --grad-accum does: the
// update's memory traffic (AdamW reads and writes ~30 bytes a trainable weight) spread over
// K times the tokens; model_flops counts all K.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <vector>

#include "io/safetensors.h"
#include "model/precision.h"
#include "profile.h"
#include "train/flops.h"
#include "model/visualchat.h"
#include "parallel/zero.h"
#include "train/synthetic.h"

using namespace vchat;
namespace po = boost::program_options;

static int run(int argc, char** argv) {
  std::string model_file = "inputs/models/small.json", train = "default", attention = "mmca", batch_out;
  std::string device = "cpu", precision = "auto", recompute = "none", attention_backward = "deterministic";
  double peak_tflops = 0;
  int64_t batch = 2, seq = 512, images = 4, warmup = 1, iters = 3, micro_batches = 1;
  int threads = 2;
  bool profile_ops = false;
  po::options_description o("vchat-bench-step");
  o.add_options()("model", po::value(&model_file))("train", po::value(&train))("attention", po::value(&attention))(
      "batch", po::value(&batch))("seq-len", po::value(&seq))("images", po::value(&images))(
      "threads", po::value(&threads))("warmup", po::value(&warmup))("iters", po::value(&iters))(
      "batch-out", po::value(&batch_out))("device", po::value(&device))("precision", po::value(&precision))(
      "recompute", po::value(&recompute))("peak-tflops", po::value(&peak_tflops))(
      "profile", po::bool_switch(&profile_ops))("attention-backward", po::value(&attention_backward))(
      "micro-batches", po::value(&micro_batches));
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, o), vm);
    po::notify(vm);
  } catch (const std::exception& e) {
    std::cerr << "vchat-bench-step: " << e.what() << "\n" << o;
    return 2;
  }
  if (micro_batches < 1) {
    std::cerr << "vchat-bench-step: --micro-batches must be >= 1, got " << micro_batches << "\n";
    return 2;
  }
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
  const ModelConfig cfg = ModelConfig::load(model_file);
  ModelOptions opt;
  opt.train = parse_train_set(train);
  opt.attention = parse_attention(attention);
  opt.recompute = parse_recompute(recompute);
  const Device dev = resolve_device(device, built_with_cuda(), device == "cpu" ? 0 : visible_gpus());
  const Precision prec = resolve_precision(precision, dev);
  const bool deterministic_attention = resolve_deterministic_attention(attention_backward, dev);
  if (dev == Device::cuda) {
    select_gpu(0);
    set_deterministic_attention(deterministic_attention);
  }
  VisualChatModel model(cfg, opt);
  init_params(model.params(), 0);
  if (dev == Device::cuda) model.to(ExecContext::of(dev), PrecisionPolicy::of(prec));
  SelfComm self;
  ZeroOptimizer adam(model.params(), self, 0, AdamWConfig{});
  SyntheticSpec spec{batch, seq, images, /*max_rounds=*/16};
  SyntheticBatches data(cfg, spec, 1);
  const Batch host_batch = data.next();
  const Batch b = host_batch.to(dev);
  if (!batch_out.empty()) {
    TensorFile f;
    f.tensors = {{"input.tokens", host_batch.tokens}, {"input.modality", host_batch.modality},
                 {"input.targets", host_batch.targets}, {"input.pixels", host_batch.pixels}};
    f.metadata = {{"config", cfg.to_json()}, {"train", train}, {"attention", attention}};
    save_safetensors(batch_out, f);
  }
  // One training step as the trainer runs it, timed until the device has finished it: the
  // loss sums into a device scalar (no copy between forward and backward), the update
  // writes the gradient's sum of squares beside it, and both come back in one copy.
  // On a GPU also the host's part: the time until the step's work is enqueued (the host
  // first waits at the copy back), and the kernels and GEMMs enqueued. Where host_ms comes
  // near the step's time, the GPU waits for launches, not the host for the GPU.
  const bool gpu = dev == Device::cuda;
  double host_ms = 0;
  uint64_t launches = 0;
  const Tensor scalars = Tensor::zeros({2}, DType::f32, dev);  // [loss sum, gradient sum of squares]
  const float loss_scale =
      1.f / static_cast<float>(micro_batches * std::max<int64_t>(1, host_batch.supervised_count()));
  auto step_ms = [&] {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t launches0 = gpu ? gpu_launches() : 0;
    adam.zero_grads();
    scalars.zero_();
    for (int64_t m = 0; m < micro_batches; ++m) {
      model.stage_forward(0, b, Tensor(), /*backward_follows=*/true, nullptr, false, scalars.slice(0, 0, 1));
      model.stage_backward(0, b, Tensor(), loss_scale);
    }
    adam.update(1e-4f, scalars.slice(0, 1, 2));
    host_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    launches = gpu ? gpu_launches() - launches0 : 0;
    const std::vector<float> back = scalars.to_vector_f32();  // waits for the step's device work
    if (!std::isfinite(back[0]) || !std::isfinite(back[1]))
      throw std::runtime_error("vchat-bench-step: the step's loss or gradient norm is not finite");
    synchronize(dev);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<double> ms, host;
  for (int64_t i = 0; i < warmup + iters; ++i) {
    const double t = step_ms();
    if (i >= warmup) ms.push_back(t), host.push_back(host_ms);
  }
  std::sort(ms.begin(), ms.end());
  std::sort(host.begin(), host.end());
  // Model FLOPs of the step (src/train/flops.cpp), over the device's peak: MFU.
  const double flops =
      static_cast<double>(micro_batches) * step_flops(cfg, opt, batch * b.seq_len(), b.seq_len(), b.n_images()).total();
  const double peak = peak_tflops > 0 ? peak_tflops * 1e12 : dev == Device::cuda ? gpu_peak_flops(prec) : measured_sgemm_peak();
  // On a GPU, the most memory its tensors held at once (as PyTorch's max_memory_allocated,
  // which bench/gpu_torch_step.py prints as peak_mem_gib).
  char gpu_mem[48] = "";
  if (dev == Device::cuda)
    std::snprintf(gpu_mem, sizeof gpu_mem, " peak_gpu_mem_gib=%.2f", gpu_memory_peak_in_use() / double(1 << 30));
  std::printf(
      "# model=%s train=%s attention=%s batch=%lld seq=%lld images=%lld tokens=%lld threads=%d attention_backward=%s "
      "micro_batches=%lld%s\n",
      cfg.name.c_str(), train.c_str(), attention.c_str(), (long long)batch, (long long)seq, (long long)b.n_images(),
      (long long)b.non_pad_count(), threads, attention_backward.c_str(), (long long)micro_batches, gpu_mem);
  if (gpu)  // (a line of its own: the result line below is what scripts parse)
    std::printf("# host: %.2f ms to enqueue a step (median), %llu launches a step (kernels and GEMMs), %.1f us each\n",
                host[host.size() / 2], (unsigned long long)launches,
                host[host.size() / 2] * 1e3 / std::max<uint64_t>(1, launches));
  std::printf("vchat_step_ms median=%.2f min=%.2f iters=%lld threads=%d device=%s precision=%s model_flops=%.6e "
              "mfu=%.4f peak_tflops=%.1f\n",
              ms[ms.size() / 2], ms[0], (long long)iters, threads, device_name(dev), precision_name(prec), flops,
              flops / (ms[ms.size() / 2] * 1e-3 * peak), peak / 1e12);
  // Flushed first: the figures above come back even if the profiled step fails.
  std::fflush(stdout);
  if (profile_ops) {  // one more step, not among the timed ones: events per op slow it down
    profile::enable(true);
    const double t = step_ms();
    profile::enable(false);
    // On a GPU, each op against its roofline: the MFU peak above and the memory's bandwidth.
    const profile::Peaks peaks{peak, dev == Device::cuda ? gpu_memory_bandwidth() : 0.0};
    const std::string table = profile::format(profile::report(), peaks);
    std::printf("# op profile of one step (%.2f ms with the profiler on; CUDA ops: GPU time", t);
    if (peaks.bytes_per_s > 0)
      std::printf("; roofline at %.1f TFLOP/s and %.0f GB/s", peaks.flops_per_s / 1e12, peaks.bytes_per_s / 1e9);
    std::printf("):\n");
    size_t at = 0;
    while (at < table.size()) {
      const size_t nl = table.find('\n', at);
      std::printf("#   %s\n", table.substr(at, nl - at).c_str());
      at = nl == std::string::npos ? table.size() : nl + 1;
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", "vchat-bench-step", e.what());
    return 1;
  }
}
