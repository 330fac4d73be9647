// Cross-entropy over the vocabulary without an fp32 [N, V] buffer: one block per row reads
// the row's logits (compute dtype) once for the statistics and once for the gradient,
// which it writes over the logits. Plus the vocabulary-parallel pieces and argmax.
#include <cfloat>
#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

constexpr int kThreads = 512;

// Online max and sum of exp over a row: each thread keeps its own (max, sum) over a strided
// slice, then the block combines them (rescaling each sum to the block max).
template <class T>
__device__ void row_stats(const T* row, int64_t V, float& mx, float& sum) {
  float m = -INFINITY, s = 0.f;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const float x = ld(row, c);
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else if (x != -INFINITY) {  // (-inf - -inf would be NaN; its exp is 0)
      s += expf(x - m);
    }
  }
  mx = block_max(m);
  // A thread that saw nothing above -inf adds 0; one whose slice was all NaN (its max still
  // -inf, its sum NaN) must pass the NaN on, as the CPU's loss does: s, not m, decides.
  sum = block_sum(s == 0.f ? 0.f : s * expf(m - mx));
}

template <class T>
__global__ void ce_fwd_kernel(const T* logits, const int32_t* targets, int64_t V, float* lse, float* row_loss) {
  const int64_t r = blockIdx.x;
  const int32_t t = targets[r];
  if (t < 0) {  // block-uniform: no statistics, no loss
    if (threadIdx.x == 0) lse[r] = row_loss[r] = 0.f;
    return;
  }
  float mx, sum;
  row_stats(logits + r * V, V, mx, sum);
  if (threadIdx.x == 0) {
    const float l = mx + logf(sum);
    lse[r] = l;
    // Targets >= V are the data path's to refuse (Batch::validate); here they only must not read out of bounds.
    row_loss[r] = t < V ? l - ld(logits, r * V + t) : NAN;
  }
}

template <class T>
__global__ void ce_bwd_kernel(const T* logits, const int32_t* targets, const float* lse, float scale, T* dlogits,
                              int64_t V, int64_t vocab_begin) {
  const int64_t r = blockIdx.x;
  const int64_t t = targets[r] < 0 ? -1 : int64_t(targets[r]) - vocab_begin;  // column here, or outside [0, V)
  const float l = lse[r];
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    float d = 0.f;
    if (targets[r] >= 0) d = expf(ld(logits, r * V + c) - l) * scale - (c == t ? scale : 0.f);
    st(dlogits, r * V + c, d);
  }
}

template <class T>
__global__ void ce_max_kernel(const T* logits, const int32_t* targets, int64_t V, float* row_max) {
  const int64_t r = blockIdx.x;
  if (targets[r] < 0) {
    if (threadIdx.x == 0) row_max[r] = 0.f;
    return;
  }
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, ld(logits, r * V + c));
  m = block_max(m);
  if (threadIdx.x == 0) row_max[r] = m;
}

template <class T>
__global__ void ce_sumexp_kernel(const T* logits, const int32_t* targets, const float* row_max, int64_t V,
                                 int64_t vocab_begin, float* sumexp, float* target_logit) {
  const int64_t r = blockIdx.x;
  if (targets[r] < 0) {
    if (threadIdx.x == 0) sumexp[r] = target_logit[r] = 0.f;
    return;
  }
  const float m = row_max[r];
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) s += expf(ld(logits, r * V + c) - m);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const int64_t t = int64_t(targets[r]) - vocab_begin;
    sumexp[r] = s;
    target_logit[r] = t >= 0 && t < V ? ld(logits, r * V + t) : 0.f;
  }
}

// The larger value wins, NaN above everything; on a tie (two NaNs too) the smaller index:
// torch.argmax, and cpu::argmax.
__device__ __forceinline__ void better(float& v, int64_t& i, float v2, int64_t i2) {
  const bool nan = v != v, nan2 = v2 != v2;
  if ((nan2 && (!nan || i2 < i)) || (!nan && (v2 > v || (v2 == v && i2 < i)))) {
    v = v2;
    i = i2;
  }
}

template <class T>
__global__ void argmax_kernel(const T* logits, int64_t V, int32_t* index, float* value) {
  const int64_t r = blockIdx.x;
  float v = -INFINITY;
  int64_t i = INT64_MAX;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) better(v, i, ld(logits, r * V + c), c);
  for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x / 32); ++w) better(v, i, sv[w], si[w]);
    index[r] = V > 0 ? static_cast<int32_t>(i) : 0;
    value[r] = V > 0 ? v : 0.f;
  }
}

struct LossShape {
  int64_t N, V;
};
LossShape loss_shape(const char* op, const Tensor& logits, const Tensor& targets) {
  VCHAT_CHECK(logits.dim() == 2, op << ": logits must be [N, V], got " << shape_str(logits.shape()));
  expect(op, {"targets", targets}, {DType::i32});
  VCHAT_CHECK(targets.numel() == logits.size(0),
              op << ": targets " << shape_str(targets.shape()) << " for logits " << shape_str(logits.shape()));
  return {logits.size(0), logits.size(1)};
}
void expect_n(const char* op, std::initializer_list<Arg> args, int64_t n) {
  for (const Arg& a : args) {
    expect(op, a, {DType::f32});
    VCHAT_CHECK(a.t.numel() == n, op << ": operand " << a.name << " " << shape_str(a.t.shape()) << " needs " << n
                                     << " elements");
  }
}

}  // namespace

void cross_entropy_fwd(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                       const Tensor& row_loss) {
  const char* op = "cuda::cross_entropy_fwd";
  const DType dt = expect_compute(op, {{"logits", logits}});
  const auto [N, V] = loss_shape(op, logits, targets);
  expect_n(op, {{"lse", lse}, {"row_loss", row_loss}}, N);
  if (N == 0) return;
  VCHAT_DISPATCH(dt, T,
    ce_fwd_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream_of(c)>>>(ptr<T>(logits), ptr<int32_t>(targets), V,
                                                                          ptr<float>(lse), ptr<float>(row_loss));
  );
  CUDA_CHECK_LAUNCH();
}

void cross_entropy_bwd(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_begin) {
  const char* op = "cuda::cross_entropy_bwd";
  const DType dt = expect_compute(op, {{"logits", logits}, {"dlogits", dlogits}});
  const auto [N, V] = loss_shape(op, logits, targets);
  expect_n(op, {{"lse", lse}}, N);
  VCHAT_CHECK(dlogits.shape() == logits.shape(), op << ": dlogits " << shape_str(dlogits.shape()) << " for logits "
                                                    << shape_str(logits.shape()));
  if (N == 0) return;
  VCHAT_DISPATCH(dt, T,
    ce_bwd_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream_of(c)>>>(
        ptr<T>(logits), ptr<int32_t>(targets), ptr<float>(lse), scale, ptr<T>(dlogits), V, vocab_begin);
  );
  CUDA_CHECK_LAUNCH();
}

void ce_row_max(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& row_max) {
  const char* op = "cuda::ce_row_max";
  const DType dt = expect_compute(op, {{"logits", logits}});
  const auto [N, V] = loss_shape(op, logits, targets);
  expect_n(op, {{"row_max", row_max}}, N);
  if (N == 0) return;
  VCHAT_DISPATCH(dt, T,
    ce_max_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream_of(c)>>>(ptr<T>(logits), ptr<int32_t>(targets), V,
                                                                          ptr<float>(row_max));
  );
  CUDA_CHECK_LAUNCH();
}

void ce_row_sumexp(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& row_max,
                   int64_t vocab_begin, const Tensor& sumexp, const Tensor& target_logit) {
  const char* op = "cuda::ce_row_sumexp";
  const DType dt = expect_compute(op, {{"logits", logits}});
  const auto [N, V] = loss_shape(op, logits, targets);
  expect_n(op, {{"row_max", row_max}, {"sumexp", sumexp}, {"target_logit", target_logit}}, N);
  if (N == 0) return;
  VCHAT_DISPATCH(dt, T,
    ce_sumexp_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream_of(c)>>>(
        ptr<T>(logits), ptr<int32_t>(targets), ptr<float>(row_max), V, vocab_begin, ptr<float>(sumexp),
        ptr<float>(target_logit));
  );
  CUDA_CHECK_LAUNCH();
}

namespace {
__global__ void ce_finish_kernel(const float* mx, const float* se, const float* tl, const int32_t* t, int64_t n,
                                 float* lse, float* row_loss) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float l = t[i] >= 0 ? mx[i] + logf(se[i]) : 0.f;
  lse[i] = l;
  row_loss[i] = t[i] >= 0 ? l - tl[i] : 0.f;
}
}  // namespace

void ce_finish(const Context& c, const Tensor& row_max, const Tensor& sumexp, const Tensor& target_logit,
               const Tensor& targets, const Tensor& lse, const Tensor& row_loss) {
  const char* op = "cuda::ce_finish";
  expect(op, {"targets", targets}, {DType::i32});
  const int64_t N = targets.numel();
  expect_n(op, {{"row_max", row_max}, {"sumexp", sumexp}, {"target_logit", target_logit}, {"lse", lse},
                {"row_loss", row_loss}},
           N);
  if (N == 0) return;
  ce_finish_kernel<<<static_cast<unsigned>((N + 255) / 256), 256, 0, stream_of(c)>>>(
      ptr<float>(row_max), ptr<float>(sumexp), ptr<float>(target_logit), ptr<int32_t>(targets), N, ptr<float>(lse),
      ptr<float>(row_loss));
  CUDA_CHECK_LAUNCH();
}

void argmax(const Context& c, const Tensor& logits, const Tensor& index, const Tensor& value) {
  const char* op = "cuda::argmax";
  const DType dt = expect_compute(op, {{"logits", logits}});
  VCHAT_CHECK(logits.dim() == 2, op << ": logits must be [N, V], got " << shape_str(logits.shape()));
  const int64_t N = logits.size(0), V = logits.size(1);
  expect(op, {"index", index}, {DType::i32});
  VCHAT_CHECK(index.numel() == N, op << ": index " << shape_str(index.shape()) << " for " << N << " rows");
  expect_n(op, {{"value", value}}, N);
  if (N == 0) return;
  VCHAT_DISPATCH(dt, T,
    argmax_kernel<<<static_cast<unsigned>(N), kThreads, 0, stream_of(c)>>>(ptr<T>(logits), V, ptr<int32_t>(index),
                                                                          ptr<float>(value));
  );
  CUDA_CHECK_LAUNCH();
}

}  // namespace vchat::cuda
