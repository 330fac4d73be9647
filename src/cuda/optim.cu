// Optimizer kernels: the multi-tensor sum of squares for gradient clipping (deterministic:
// fixed partials, summed in order in double) and the fused AdamW that also writes the bf16
// working copy, so an update reads and writes each fp32 state once.
#include <algorithm>
#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

constexpr int kThreads = 256, kChunk = 48;
// A tensor's sum of squares is split over blocks of about kPerBlock elements, at most
// kMaxBlocks of them: one block for a bias, a thousand for a 65M-element embedding gradient
// (a fixed count per tensor would leave that one to a few blocks, or launch thousands of
// empty blocks for the small ones).
constexpr int64_t kPerBlock = 16 * kThreads;
constexpr int kMaxBlocks = 1024;

int blocks_for(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kPerBlock - 1) / kPerBlock, 1, kMaxBlocks));
}

// Up to kChunk tensors per launch, passed by value (no descriptor upload); tensor k owns
// the launch's blocks [first[k], first[k + 1]).
struct Chunk {
  const float* p[kChunk];
  int64_t n[kChunk];
  int first[kChunk + 1];
  int count;
};

// One partial per block, at partial[blockIdx.x]: the layout depends only on the tensors'
// sizes, so the sum that sumsq_finish makes of them is the same on every run.
__global__ void sumsq_partial(Chunk chunk, float* partial) {
  const int b = blockIdx.x;
  int k = 0;
  while (k + 1 < chunk.count && chunk.first[k + 1] <= b) ++k;
  const float* p = chunk.p[k];
  const int64_t n = chunk.n[k];
  const int64_t j = b - chunk.first[k], blocks = chunk.first[k + 1] - chunk.first[k];
  float s = 0.f;
  for (int64_t i = j * blockDim.x + threadIdx.x; i < n; i += blocks * blockDim.x) s += p[i] * p[i];
  s = block_sum(s);
  if (threadIdx.x == 0) partial[b] = s;
}

__global__ void sumsq_finish(const float* partial, int64_t n, float* out) {
  __shared__ double part[kThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(part[0]);
}

__global__ void sum_into_kernel(const float* x, int64_t n, float* acc) {
  __shared__ double part[kThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) acc[0] += static_cast<float>(part[0]);
}

// The same formula as cpu::clip_scale (double norm, one rounding).
__global__ void clip_scale_kernel(const float* grad_sq, float max_norm, float* scale) {
  const double norm = sqrt(static_cast<double>(*grad_sq));
  *scale = !isfinite(norm)                     ? NAN
           : max_norm > 0 && norm > max_norm ? static_cast<float>(max_norm / (norm + 1e-6))
                                              : 1.f;
}

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, bf16* working, int64_t n, float lr,
                             float beta1, float beta2, float eps, float wd, float bc1, float bc2,
                             const float* grad_scale) {
  const float gs = grad_scale ? *grad_scale : 1.f;
  if (!isfinite(gs)) return;  // a diverged step changes nothing; the host reports it
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float gi = g[i] * gs;
    const float mi = beta1 * m[i] + (1.f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i] - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p[i]);
    p[i] = pi;
    if (working) working[i] = __float2bfloat16_rn(pi);
  }
}

}  // namespace

void sum_squares(const Context& c, const std::vector<Tensor>& xs, const Tensor& out) {
  const char* op = "cuda::sum_squares";
  expect_f32(op, {{"out", out}});
  VCHAT_CHECK(out.numel() == 1, op << ": out must hold one value, got " << shape_str(out.shape()));
  for (const Tensor& x : xs) expect_f32(op, {{"x", x}});
  const int64_t count = static_cast<int64_t>(xs.size());
  int64_t total = 0;
  for (const Tensor& x : xs) total += blocks_for(x.numel());
  Tensor partial = Tensor::zeros({std::max<int64_t>(1, total)}, DType::f32, Device::cuda);
  int64_t at = 0;  // the first partial of this launch
  for (int64_t base = 0; base < count; base += kChunk) {
    Chunk ch{};
    ch.count = static_cast<int>(std::min<int64_t>(kChunk, count - base));
    for (int j = 0; j < ch.count; ++j) {
      ch.p[j] = ptr<float>(xs[base + j]);
      ch.n[j] = xs[base + j].numel();
      ch.first[j + 1] = ch.first[j] + blocks_for(ch.n[j]);
    }
    const int blocks = ch.first[ch.count];
    sumsq_partial<<<blocks, kThreads, 0, stream_of(c)>>>(ch, ptr<float>(partial) + at);
    CUDA_CHECK_LAUNCH();
    at += blocks;
  }
  sumsq_finish<<<1, kThreads, 0, stream_of(c)>>>(ptr<float>(partial), partial.numel(), ptr<float>(out));
  CUDA_CHECK_LAUNCH();
}

void sum_into(const Context& c, const Tensor& x, const Tensor& acc) {
  const char* op = "cuda::sum_into";
  expect_f32(op, {{"x", x}, {"acc", acc}});
  VCHAT_CHECK(acc.numel() == 1, op << ": acc must hold one value, got " << shape_str(acc.shape()));
  sum_into_kernel<<<1, kThreads, 0, stream_of(c)>>>(ptr<float>(x), x.numel(), ptr<float>(acc));
  CUDA_CHECK_LAUNCH();
}

void clip_scale(const Context& c, const Tensor& grad_sq, float max_norm, const Tensor& scale) {
  const char* op = "cuda::clip_scale";
  expect_f32(op, {{"grad_sq", grad_sq}, {"scale", scale}});
  VCHAT_CHECK(grad_sq.numel() == 1 && scale.numel() == 1, op << ": grad_sq and scale must hold one value each");
  clip_scale_kernel<<<1, 1, 0, stream_of(c)>>>(ptr<float>(grad_sq), max_norm, ptr<float>(scale));
  CUDA_CHECK_LAUNCH();
}

void adamw_step(const Context& c, const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                const ops::AdamWParams& a, const Tensor& working, const float* grad_scale) {
  const char* op = "cuda::adamw_step";
  expect_f32(op, {{"param", param}, {"grad", grad}, {"m", m}, {"v", v}});
  const int64_t n = param.numel();
  for (const Arg& x : {Arg{"grad", grad}, Arg{"m", m}, Arg{"v", v}})
    VCHAT_CHECK(x.t.numel() == n, op << ": operand " << x.name << " has " << x.t.numel() << " elements, param " << n);
  if (working.defined()) {
    expect(op, {"working", working}, {DType::bf16});
    VCHAT_CHECK(working.numel() == n, op << ": operand working has " << working.numel() << " elements, param " << n);
  }
  if (n == 0) return;
  // Bias corrections as the CPU op computes them (double pow, rounded once).
  const float bc1 = 1.f - static_cast<float>(std::pow(a.beta1, static_cast<double>(a.step)));
  const float bc2 = 1.f - static_cast<float>(std::pow(a.beta2, static_cast<double>(a.step)));
  adamw_kernel<<<grid_for(n, kThreads), kThreads, 0, stream_of(c)>>>(
      ptr<float>(param), ptr<float>(grad), ptr<float>(m), ptr<float>(v),
      working.defined() ? ptr<bf16>(working) : nullptr, n, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, bc1, bc2,
      grad_scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace vchat::cuda
