// The whole model and the training step on a GPU (part of the GPU suite, label `gpu`):
// the loss and every trainable gradient against the CPU (fp32 within 1e-4, bf16 within
// 2e-2), the bf16 loss curve of 50 training steps against the CPU's fp32 curve (within 2%
// at every step), recomputation on the device, and generation with the KV cache on the device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "cuda/cuda_backend.h"
#include "model/kv_cache.h"
#include "model/precision.h"
#include "model/visualchat.h"
#include "train/device_batches.h"
#include "train/synthetic.h"
#include "train/trainer.h"
#ifdef VCHAT_EMULATED_DEVICE
#include "cuda_runtime.h"  // the emulated runtime (tests/emu/sdk): vchat::emu::host_waits
#endif

namespace vchat {
namespace {

class CudaModel : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_GT(cuda::device_count(), 0) << "no CUDA device visible: the GPU suite needs one";
    cuda::init_backend(0);
  }
};

// The repository root: $VCHAT_SOURCE_DIR on a lent machine (tools/gpu/check.sh sets it to the
// copy of the tree there), else where this was built from.
std::string source_dir() {
  const char* env = std::getenv("VCHAT_SOURCE_DIR");
  return env ? env : VCHAT_SOURCE_DIR;
}
ModelConfig config(const std::string& name) {
  return ModelConfig::load(source_dir() + "/inputs/models/" + name + ".json");
}

double rel(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

struct Outcome {
  double loss;
  std::vector<std::pair<std::string, std::vector<float>>> grads;
};

Outcome run_model(const ModelConfig& cfg, const ModelOptions& opt, const Batch& batch, Device device, Precision p) {
  VisualChatModel m(cfg, opt);
  init_params(m.params(), 3);
  if (device == Device::cuda) m.to(ExecContext::of(Device::cuda), PrecisionPolicy::of(p));
  Outcome o;
  o.loss = m.forward_backward(device == Device::cuda ? batch.to(Device::cuda) : batch, true).loss;
  for (Param* prm : m.params().trainable()) o.grads.emplace_back(prm->name, prm->grad.to_vector_f32());
  return o;
}

// The CUDA build knows it is one and, with a GPU visible, `--device auto` takes it (the CPU
// build's twin is Precision.ThisBuildReportsItsBackend).
TEST_F(CudaModel, ThisBuildReportsCudaAndAutoPicksTheGpu) {
  EXPECT_TRUE(built_with_cuda());
  EXPECT_EQ(visible_gpus(), cuda::device_count());
  EXPECT_EQ(resolve_device("auto", built_with_cuda(), visible_gpus()), Device::cuda);
  EXPECT_EQ(resolve_precision("auto", Device::cuda), Precision::bf16);
}

TEST_F(CudaModel, LossAndEveryTrainableGradientMatchTheCpu) {
  const ModelConfig cfg = config("tiny");
  SyntheticSpec spec;
  spec.batch_size = 2;
  spec.seq_len = 160;
  const Batch batch = SyntheticBatches(cfg, spec, 21).next();
  for (TrainSet set : {TrainSet::full, TrainSet::lora, TrainSet::paper_default})
    for (ops::AttnMode mode : {ops::AttnMode::mmca, ops::AttnMode::causal}) {
      ModelOptions opt;
      opt.train = set;
      opt.attention = mode;
      const std::string what = std::string(train_set_name(set)) + (mode == ops::AttnMode::mmca ? " mmca" : " causal");
      const Outcome cpu = run_model(cfg, opt, batch, Device::cpu, Precision::fp32);
      for (Precision p : {Precision::fp32, Precision::bf16}) {
        const double tol = p == Precision::fp32 ? 1e-4 : 2e-2;
        const Outcome gpu = run_model(cfg, opt, batch, Device::cuda, p);
        EXPECT_NEAR(gpu.loss, cpu.loss, tol * cpu.loss) << what << " " << precision_name(p);
        ASSERT_EQ(gpu.grads.size(), cpu.grads.size());
        for (size_t i = 0; i < cpu.grads.size(); ++i)
          EXPECT_LE(rel(gpu.grads[i].second, cpu.grads[i].second), tol)
              << what << " " << precision_name(p) << " " << cpu.grads[i].first;
      }
    }
}

TEST_F(CudaModel, RecomputedBlocksGiveTheSameGradientsOnTheDevice) {
  const ModelConfig cfg = config("tiny");
  SyntheticSpec spec;
  spec.batch_size = 2;
  spec.seq_len = 128;
  const Batch batch = SyntheticBatches(cfg, spec, 5).next();
  ModelOptions opt;
  opt.train = TrainSet::full;
  const Outcome stored = run_model(cfg, opt, batch, Device::cuda, Precision::bf16);
  opt.recompute = Recompute::block;
  const Outcome recomputed = run_model(cfg, opt, batch, Device::cuda, Precision::bf16);
  EXPECT_EQ(stored.loss, recomputed.loss);
  for (size_t i = 0; i < stored.grads.size(); ++i)
    EXPECT_EQ(stored.grads[i].second, recomputed.grads[i].second) << stored.grads[i].first;
}

// 50 steps of the paper's setting on synthetic data: the bf16 GPU curve tracks the fp32 CPU curve.
// On one batch, every step: on fresh batches of synthetic tokens the paper's trainable set
// learns nearly nothing in 50 steps (small's fp32 curve stays at 9.09 +- 0.07, tiny's at 6.24,
// ln V), so a device that gave uniform logits would track within 2% and pass. Fitting one
// batch, the curve falls (tiny 6.26 -> 5.36, small 9.09 -> 5.26 on the CPU) and a device
// that does not learn as the CPU does falls behind it.
void expect_curves_track(const std::string& model, int64_t seq_len) {
  auto curve = [&](Device d, Precision p) {
    TrainConfig c;
    c.model = config(model);
    c.model_options.train = TrainSet::paper_default;
    c.data.batch_size = 2;
    c.data.seq_len = seq_len;
    c.steps = 50;
    c.fixed_batch = true;
    c.lr = LrSchedule{1e-3f, 1e-4f, 5, 50};
    c.device = d;
    c.precision = p;
    Trainer t(c);
    std::vector<double> losses;
    for (int i = 0; i < 50; ++i) losses.push_back(t.step().loss);
    return losses;
  };
  const std::vector<double> cpu = curve(Device::cpu, Precision::fp32), gpu = curve(Device::cuda, Precision::bf16);
  auto gap = [&](size_t i) { return std::abs(gpu[i] / cpu[i] - 1); };
  size_t worst = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_NEAR(gpu[i], cpu[i], 0.02 * cpu[i]) << model << " step " << i + 1;
    if (gap(i) > gap(worst)) worst = i;
  }
  EXPECT_LT(gpu.back(), 0.9 * gpu.front()) << model << ": it learns (the last loss 10% under the first at least)";
  // The margin, for the record (a GPU run's log shows how close to 2% it came).
  std::printf("[ curve    ] %s: fp32 CPU %.4f -> %.4f, bf16 device %.4f -> %.4f; largest gap %.3f%% at step %zu\n",
              model.c_str(), cpu.front(), cpu.back(), gpu.front(), gpu.back(), 100 * gap(worst), worst + 1);
}

// Chat on the GPU (vchat-chat --device cuda): the KV cache lives on the device in the compute
// dtype and VisualChatModel::extend runs there; after each stretch (text around an image;
// text; two images and text; then one token at a time, as generation extends) the last
// position's logits equal the CPU's (fp32 within 1e-4, bf16 within 2e-2), for MMCA and
// causal attention.
TEST_F(CudaModel, ChatExtendOnTheDeviceMatchesTheCpu) {
  const ModelConfig cfg = config("tiny");
  const int64_t T = cfg.vision.tokens_per_image(), S = cfg.vision.image_size, V = cfg.llm.vocab_size;
  for (ops::AttnMode mode : {ops::AttnMode::mmca, ops::AttnMode::causal})
    for (Precision p : {Precision::fp32, Precision::bf16}) {
      const std::string what = std::string(mode == ops::AttnMode::mmca ? "mmca " : "causal ") + precision_name(p);
      ModelOptions opt;
      opt.attention = mode;
      VisualChatModel cpu(cfg, opt), gpu(cfg, opt);
      init_params(cpu.params(), 5);
      init_params(gpu.params(), 5);
      gpu.to(ExecContext::of(Device::cuda), PrecisionPolicy::of(p));
      KvCache cpu_cache, gpu_cache;
      std::mt19937_64 rng(11);
      std::normal_distribution<float> g;
      for (const std::vector<int>& stretch :
           std::vector<std::vector<int>>{{5, -1, 4}, {3}, {-1, -1, 6}, {1}, {1}, {1}}) {
        Extension e;
        std::vector<float> pix;
        int64_t n_img = 0;
        for (int piece : stretch) {
          const bool image = piece < 0;
          const int64_t len = image ? T : piece;
          for (int64_t i = 0; i < len; ++i) e.tokens.push_back(image ? 0 : static_cast<int32_t>(3 + rng() % (V - 3)));
          e.modality.insert(e.modality.end(), len, image ? ops::kImage : ops::kText);
          if (image) {
            for (int64_t i = 0; i < 3 * S * S; ++i) pix.push_back(g(rng));
            ++n_img;
          }
        }
        if (n_img) e.pixels = Tensor::from_vector(pix, {n_img, 3, S, S});
        const std::vector<float> want = cpu.extend(e, cpu_cache).to_vector_f32();
        const std::vector<float> got = gpu.extend(e, gpu_cache).to_vector_f32();
        EXPECT_EQ(gpu_cache.layers.at(0).k.device(), Device::cuda) << what;
        EXPECT_EQ(gpu_cache.length, cpu_cache.length) << what;
        EXPECT_LE(rel(got, want), p == Precision::fp32 ? 1e-4 : 2e-2) << what << " after " << cpu_cache.length << " positions";
      }
    }
}

// A step's batches through pinned staging on the copy stream: every tensor arrives intact,
// across steps (staging reused, then grown for a bigger step), and micro-batch k's copies
// are waited for by the compute stream before it reads them.
TEST_F(CudaModel, BatchesArriveThroughTheCopyStream) {
  const ModelConfig cfg = config("tiny");
  DeviceBatches up(ExecContext::of(Device::cuda));
  for (const int64_t seq : {int64_t{96}, int64_t{64}, int64_t{200}}) {
    SyntheticSpec spec;
    spec.batch_size = 2;
    spec.seq_len = seq;
    SyntheticBatches gen(cfg, spec, 7 + seq);
    const std::vector<Batch> host = {gen.next(), gen.next(), gen.next()};
    const std::vector<Batch>& dev = up.upload(host);
    ASSERT_EQ(dev.size(), host.size());
    for (size_t m = 0; m < host.size(); ++m) {
      up.ready(static_cast<int>(m));
      const auto same = [&](const Tensor& d, const Tensor& h, const char* what) {
        ASSERT_EQ(d.defined(), h.defined()) << what;
        if (!h.defined()) return;
        EXPECT_EQ(d.device(), Device::cuda) << what;
        const Tensor back = d.to(Device::cpu);
        ASSERT_EQ(back.nbytes(), h.nbytes()) << what;
        EXPECT_EQ(std::memcmp(back.raw(), h.raw(), h.nbytes()), 0) << what << " of micro-batch " << m << ", L " << seq;
      };
      same(dev[m].tokens, host[m].tokens, "tokens");
      same(dev[m].modality, host[m].modality, "modality");
      same(dev[m].targets, host[m].targets, "targets");
      same(dev[m].pixels, host[m].pixels, "pixels");
      same(dev[m].embed_ids, host[m].embed_ids, "embed_ids");
      same(dev[m].image_rows, host[m].image_rows, "image_rows");
      same(dev[m].embed_groups.order, host[m].embed_groups.order, "embed_groups.order");
    }
  }
}

#ifdef VCHAT_EMULATED_DEVICE
// The host waits for the device three times a step, all at its ends: for the copy stream's
// last copies before it stages the next batch (Uploader::begin), for the one copy back of
// the loss and the gradient norm, and for the whole device to close the step's time. Any
// other wait in a step (a tensor read back mid-model, a cudaFree, a synchronous cudaMemcpy)
// would make the host wait out the GPU's queue there instead of running ahead of it.
// The emulated runtime sees every such call, which a GPU does not count: so this test runs
// only here. fp32 and bf16, two micro-batches, decoder blocks stored or recomputed.
TEST_F(CudaModel, ATrainingStepWaitsForTheDeviceOnlyAtItsEnds) {
  for (Precision p : {Precision::fp32, Precision::bf16})
    for (Recompute recompute : {Recompute::none, Recompute::block}) {
      const std::string what = std::string(precision_name(p)) + (recompute == Recompute::block ? ", recompute" : "");
      TrainConfig c;
      c.model = config("tiny");
      c.model_options.train = TrainSet::full;
      c.model_options.recompute = recompute;
      c.data.batch_size = 2;
      c.data.seq_len = 64;
      c.micro_batches = 2;
      c.fixed_batch = true;  // the same staging every step (a larger batch regrows it: cudaFreeHost)
      c.steps = 4;
      c.device = Device::cuda;
      c.precision = p;
      Trainer t(c);
      t.step();  // the first allocates: staging, the optimizer's state
      vchat::emu::reset_host_waits();
      constexpr uint64_t kSteps = 3;
      for (uint64_t i = 0; i < kSteps; ++i) t.step();
      const std::map<std::string, uint64_t> want = {
          {"cudaStreamSynchronize", 2 * kSteps},           // the copy stream; the copy back
          {"cudaMemcpyAsync to pageable memory", kSteps},  // the loss and the gradient norm
          {"cudaDeviceSynchronize", kSteps},               // the step's end
      };
      EXPECT_EQ(vchat::emu::host_waits(), want) << what;
    }
}
#endif

TEST_F(CudaModel, TinyBf16LossCurveTracksTheCpuFp32Curve) { expect_curves_track("tiny", 160); }
TEST_F(CudaModel, SmallBf16LossCurveTracksTheCpuFp32Curve) { expect_curves_track("small", 320); }

}  // namespace
}  // namespace vchat
