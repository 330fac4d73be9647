// The attention kernels on a GPU: forward + backward time of MMCA (and causal) at a given
// shape, bf16, with a given fraction of image tokens in runs of one image each. The PyTorch
// side of the comparison (flash SDPA, causal, same shape) is bench/gpu_torch_attn.py.
//   vchat-bench-attn --seq-len 2048 --heads 16 --kv-heads 16 --head-dim 128 --batch 4 --image-frac 0.3
// --backward atomic-dq: the register backward with dQ added up in the dK/dV pass
// (FlashAttention-2's two passes; cuda/cuda_backend.h) instead of the deterministic three.
#include <algorithm>
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <vector>

#include "model/precision.h"
#ifdef VCHAT_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif
#include "ops.h"

using namespace vchat;
namespace po = boost::program_options;

static int run(int argc, char** argv) {
  int64_t L = 2048, H = 16, KV = 16, hd = 128, B = 4, image_tokens = 257, iters = 10;
  double frac = 0.3;
  std::string mode = "mmca", kernel = "auto", backward = "deterministic";
  po::options_description o("vchat-bench-attn");
  o.add_options()("seq-len", po::value(&L))("heads", po::value(&H))("kv-heads", po::value(&KV))(
      "head-dim", po::value(&hd))("batch", po::value(&B))("image-frac", po::value(&frac))(
      "image-tokens", po::value(&image_tokens))("iters", po::value(&iters))("mode", po::value(&mode))(
      "kernel", po::value(&kernel))("backward", po::value(&backward));
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, o), vm);
    po::notify(vm);
  } catch (const std::exception& e) {
    std::cerr << "vchat-bench-attn: " << e.what() << "\n" << o;
    return 2;
  }
  if (kernel != "auto" && kernel != "cuda-cores" && kernel != "tensor-cores" && kernel != "wmma") {
    std::cerr << "vchat-bench-attn: --kernel " << kernel << ": expected auto, cuda-cores, tensor-cores or wmma\n";
    return 2;
  }
  if (backward != "deterministic" && backward != "atomic-dq") {
    std::cerr << "vchat-bench-attn: --backward " << backward << ": expected deterministic or atomic-dq\n";
    return 2;
  }
  select_gpu(0);
  const ExecContext ex = ExecContext::of(Device::cuda);  // every op below runs on the device's stream
#ifdef VCHAT_WITH_CUDA
  // tensor-cores (or auto): the forward and backward with their tiles in registers; wmma: the
  // WMMA ones (cuda/cuda_backend.h). --backward applies to the register backward only.
  cuda::set_attention_kernel(kernel == "cuda-cores"     ? cuda::AttentionKernel::cuda_cores
                             : kernel == "tensor-cores" ? cuda::AttentionKernel::tensor_cores
                             : kernel == "wmma"         ? cuda::AttentionKernel::wmma
                                                        : cuda::AttentionKernel::automatic);
  cuda::set_attention_backward(backward == "atomic-dq" ? cuda::AttentionBackward::atomic_dq
                                                       : cuda::AttentionBackward::deterministic);
#endif
  const ops::AttnMode m = mode == "causal" ? ops::AttnMode::causal : ops::AttnMode::mmca;
  // Layout: text, then images of `image_tokens` each separated by text, until frac of L is image.
  std::vector<uint8_t> row(L, ops::kText);
  const int64_t want = static_cast<int64_t>(frac * L);
  const int64_t n_img = std::max<int64_t>(1, want / image_tokens);
  const int64_t gap = (L - n_img * image_tokens) / (n_img + 1);
  for (int64_t k = 0, pos = gap; k < n_img && pos + image_tokens <= L; ++k, pos += image_tokens + gap)
    std::fill(row.begin() + pos, row.begin() + pos + image_tokens, uint8_t{ops::kImage});
  std::vector<uint8_t> mm;
  for (int64_t b = 0; b < B; ++b) mm.insert(mm.end(), row.begin(), row.end());
  const Tensor modality = Tensor::from_vector(mm, {B, L}).to(Device::cuda);
  auto rnd = [&](Shape s) {
    Tensor h = Tensor::empty(s);
    std::mt19937 rng(1);
    std::normal_distribution<float> g;
    for (int64_t i = 0; i < h.numel(); ++i) h.data<float>()[i] = g(rng);
    Tensor d = Tensor::empty(s, DType::f32, Device::cuda), out = Tensor::empty(s, DType::bf16, Device::cuda);
    d.copy_from(h);
    ops::cast(ex, d, out);
    return out;
  };
  const Tensor q = rnd({B, L, H, hd}), k = rnd({B, L, KV, hd}), v = rnd({B, L, KV, hd}), dout = rnd({B, L, H, hd});
  const Tensor out = Tensor::empty(q.shape(), DType::bf16, Device::cuda);
  const Tensor dq = Tensor::empty(q.shape(), DType::bf16, Device::cuda), dk = Tensor::empty(k.shape(), DType::bf16, Device::cuda),
               dv = Tensor::empty(v.shape(), DType::bf16, Device::cuda);
  std::vector<double> fwd, total;
  for (int64_t i = 0; i < iters + 2; ++i) {
    synchronize(Device::cuda);
    const auto t0 = std::chrono::steady_clock::now();
    const Tensor saved = ops::attention_fwd(ex, m, q, k, v, modality, out);
    synchronize(Device::cuda);
    const auto t1 = std::chrono::steady_clock::now();
    ops::attention_bwd(ex, m, dout, q, k, v, modality, out, saved, dq, dk, dv);
    synchronize(Device::cuda);
    const auto t2 = std::chrono::steady_clock::now();
    if (i >= 2) {
      fwd.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      total.push_back(std::chrono::duration<double, std::milli>(t2 - t0).count());
    }
  }
  std::sort(fwd.begin(), fwd.end());
  std::sort(total.begin(), total.end());
  std::printf("# kernel=%s backward=%s mode=%s B=%lld L=%lld H=%lld KV=%lld hd=%lld image_frac=%.2f\n", kernel.c_str(),
              backward.c_str(), mode.c_str(), (long long)B, (long long)L, (long long)H, (long long)KV, (long long)hd,
              frac);
  std::printf("vchat_attn_ms fwd=%.3f fwd_bwd=%.3f\n", fwd[fwd.size() / 2], total[total.size() / 2]);
  return 0;
}

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", "vchat-bench-attn", e.what());
    return 1;
  }
}
