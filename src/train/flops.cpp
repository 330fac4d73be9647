#include "train/flops.h"

#include <algorithm>
#include <chrono>

#include "ops.h"

namespace vchat {

FlopCount step_flops(const ModelConfig& cfg, const ModelOptions& opt, int64_t rows, int64_t seq_len, int64_t images) {
  const LlmConfig& l = cfg.llm;
  const VisionConfig& v = cfg.vision;
  const double H = l.hidden, F = l.intermediate, V = l.vocab_size, KVD = l.n_kv_heads * l.head_dim(), L = seq_len;
  const double tokens = static_cast<double>(rows), n_img = static_cast<double>(images);
  FlopCount f;

  // LLM: per token and layer, 2 FLOPs per weight of q, k, v, o, gate, up, down, plus
  // attention's two L-long products (4·L·H); backward's activation gradients cost the same
  // matmuls again and attention twice over.
  const double layer_params = 2 * H * H + 2 * KVD * H + 3 * H * F;
  double lora_params = 0;
  if (opt.train == TrainSet::lora) {
    const double r = static_cast<double>(opt.lora_rank);
    lora_params = r * ((H + H) * 2 + (H + KVD) * 2 + (H + F) * 2 + (F + H));
  }
  const double n_layers = static_cast<double>(l.n_layers);
  f.forward += tokens * n_layers * (2 * (layer_params + lora_params) + 4 * L * H);
  f.backward += tokens * n_layers * (2 * (layer_params + lora_params) + 8 * L * H);  // dX and attention
  if (opt.train == TrainSet::full) f.backward += tokens * n_layers * 2 * layer_params;  // dW
  if (opt.train == TrainSet::lora) f.backward += tokens * n_layers * 2 * lora_params;
  f.forward += tokens * 2 * H * V;                              // lm_head
  f.backward += tokens * 2 * H * V * (opt.train == TrainSet::full ? 2 : 1);

  // ViT per image (frozen in every training set: forward only) and the projection.
  const double W = v.width, I = v.intermediate, T = static_cast<double>(v.n_positions()), P = v.patch_size;
  const double grid2 = static_cast<double>(v.grid() * v.grid());
  f.forward += n_img * (2 * 3 * P * P * W * grid2 +
                        static_cast<double>(v.layers_used()) * (T * 2 * (4 * W * W + 2 * W * I) + 4 * T * T * W));
  const double t_img = static_cast<double>(v.tokens_per_image());
  f.forward += n_img * t_img * 2 * W * H;
  f.backward += n_img * t_img * 2 * W * H;  // the projection's weight gradient (it always trains)
  return f;
}

double measured_sgemm_peak() {
  const int64_t n = 768;
  Tensor a = Tensor::zeros({n, n}), b = Tensor::zeros({n, n}), c = Tensor::zeros({n, n});
  for (int64_t i = 0; i < n * n; ++i) {
    a.data<float>()[i] = static_cast<float>(i % 7) * 0.1f;
    b.data<float>()[i] = static_cast<float>(i % 5) * 0.1f;
  }
  double best = 0;
  ops::gemm(ExecContext::cpu(), a, false, b, false, c);  // warm-up: threads, caches
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    ops::gemm(ExecContext::cpu(), a, false, b, false, c);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n / std::max(s, 1e-9));
  }
  return best;
}

}  // namespace vchat
