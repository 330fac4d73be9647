// RMSNorm and LayerNorm over the last dim: one block per row, statistics in fp32 (the
// precision policy), weight/bias gradients through the deterministic column sums.
#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

constexpr int kThreads = 256;

struct RowsCols {
  int64_t rows, cols;
};
RowsCols norm_shape(const char* op, const Tensor& x, const Tensor& w) {
  const int64_t d = x.size(-1);
  VCHAT_CHECK(w.numel() == d, op << ": weight w " << shape_str(w.shape()) << " for input x " << shape_str(x.shape()));
  return {x.numel() / d, d};
}
void expect_rows(const char* op, const char* name, const Tensor& t, int64_t n) {
  VCHAT_CHECK(t.numel() == n, op << ": operand " << name << " " << shape_str(t.shape()) << " needs " << n << " elements");
}

template <class T>
__global__ void rmsnorm_fwd_kernel(const T* x, const T* w, float eps, T* y, float* rstd, int64_t d) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = ld(xr, c);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float rs = 1.f / sqrtf(ss / d + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) st(y + r * d, c, ld(xr, c) * rs * ld(w, c));
}

// dx = rs*(dy*w) - rs^3/d * x * sum(dy*w*x)
template <class T>
__global__ void rmsnorm_bwd_kernel(const T* dy, const T* x, const T* w, const float* rstd, T* dx, int64_t d) {
  const int64_t r = blockIdx.x;
  const T *g = dy + r * d, *xr = x + r * d;
  float dot = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dot += ld(g, c) * ld(w, c) * ld(xr, c);
  dot = block_sum(dot);
  const float rs = rstd[r], k = rs * rs * rs / d * dot;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) st(dx + r * d, c, rs * ld(g, c) * ld(w, c) - k * ld(xr, c));
}

template <class T>
__global__ void layernorm_fwd_kernel(const T* x, const T* w, const T* b, float eps, T* y, float* mean, float* rstd,
                                     int64_t d) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) s += ld(xr, c);
  const float mu = block_sum(s) / d;
  float v = 0.f;  // two passes: the biased variance without cancellation
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float t = ld(xr, c) - mu;
    v += t * t;
  }
  const float rs = 1.f / sqrtf(block_sum(v) / d + eps);
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    st(y + r * d, c, (ld(xr, c) - mu) * rs * ld(w, c) + (b ? ld(b, c) : 0.f));
}

// xh = (x - mean) rs; g = dy w; dx = rs (g - mean(g) - xh mean(g xh))
template <class T>
__global__ void layernorm_bwd_kernel(const T* dy, const T* x, const T* w, const float* mean, const float* rstd, T* dx,
                                     int64_t d) {
  const int64_t r = blockIdx.x;
  const T *g = dy + r * d, *xr = x + r * d;
  const float mu = mean[r], rs = rstd[r];
  float s1 = 0.f, s2 = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float gw = ld(g, c) * ld(w, c), xh = (ld(xr, c) - mu) * rs;
    s1 += gw;
    s2 += gw * xh;
  }
  s1 = block_sum(s1) / d;
  s2 = block_sum(s2) / d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float gw = ld(g, c) * ld(w, c), xh = (ld(xr, c) - mu) * rs;
    st(dx + r * d, c, rs * (gw - s1 - xh * s2));
  }
}

}  // namespace

void rmsnorm_fwd(const Context& c, const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd) {
  const char* op = "cuda::rmsnorm_fwd";
  const DType dt = expect_compute(op, {{"x", x}, {"w", w}, {"y", y}});
  expect_f32(op, {{"rstd", rstd}});
  const RowsCols shape = norm_shape(op, x, w);
  const int64_t n = shape.rows, d = shape.cols;
  expect_rows(op, "y", y, n * d);
  expect_rows(op, "rstd", rstd, n);
  if (n == 0) return;
  VCHAT_DISPATCH(dt, T,
    rmsnorm_fwd_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream_of(c)>>>(ptr<T>(x), ptr<T>(w), eps, ptr<T>(y),
                                                                              ptr<float>(rstd), d);
  );
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_bwd(const Context& c, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                 const Tensor& dx, const Tensor& dw) {
  const char* op = "cuda::rmsnorm_bwd";
  const DType dt = expect_compute(op, {{"dy", dy}, {"x", x}, {"w", w}});
  if (dx.defined()) expect_compute(op, {{"dy", dy}, {"dx", dx}});  // undefined: not wanted
  expect_f32(op, {{"rstd", rstd}});
  const RowsCols shape = norm_shape(op, x, w);
  const int64_t n = shape.rows, d = shape.cols;
  expect_rows(op, "dy", dy, n * d);
  if (dx.defined()) expect_rows(op, "dx", dx, n * d);
  expect_rows(op, "rstd", rstd, n);
  if (dw.defined()) {
    expect_f32(op, {{"dw", dw}});
    expect_rows(op, "dw", dw, d);
  }
  if (n == 0) return;
  VCHAT_DISPATCH(dt, T,
    const T *g = ptr<T>(dy), *xp = ptr<T>(x);
    const float* rs = ptr<float>(rstd);
    if (dw.defined())  // before dx: dx may alias dy
      column_sums(c, n, d, ptr<float>(dw),
                  [=] __device__(int64_t r, int64_t col) { return ld(g, r * d + col) * ld(xp, r * d + col) * rs[r]; });
    if (dx.defined())
      rmsnorm_bwd_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream_of(c)>>>(g, xp, ptr<T>(w), rs, ptr<T>(dx), d);
  );
  CUDA_CHECK_LAUNCH();
}

void layernorm_fwd(const Context& c, const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y,
                   const Tensor& mean, const Tensor& rstd) {
  const char* op = "cuda::layernorm_fwd";
  const DType dt = expect_compute(op, {{"x", x}, {"w", w}, {"y", y}});
  if (b.defined()) expect_compute(op, {{"x", x}, {"b", b}});
  expect_f32(op, {{"mean", mean}, {"rstd", rstd}});
  const RowsCols shape = norm_shape(op, x, w);
  const int64_t n = shape.rows, d = shape.cols;
  expect_rows(op, "y", y, n * d);
  expect_rows(op, "mean", mean, n);
  expect_rows(op, "rstd", rstd, n);
  if (b.defined()) expect_rows(op, "b", b, d);
  if (n == 0) return;
  VCHAT_DISPATCH(dt, T,
    layernorm_fwd_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream_of(c)>>>(
        ptr<T>(x), ptr<T>(w), b.defined() ? ptr<T>(b) : nullptr, eps, ptr<T>(y), ptr<float>(mean), ptr<float>(rstd), d);
  );
  CUDA_CHECK_LAUNCH();
}

void layernorm_bwd(const Context& c, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                   const Tensor& rstd, const Tensor& dx, const Tensor& dw, const Tensor& db) {
  const char* op = "cuda::layernorm_bwd";
  const DType dt = expect_compute(op, {{"dy", dy}, {"x", x}, {"w", w}});
  if (dx.defined()) expect_compute(op, {{"dy", dy}, {"dx", dx}});  // undefined: not wanted
  expect_f32(op, {{"mean", mean}, {"rstd", rstd}});
  const RowsCols shape = norm_shape(op, x, w);
  const int64_t n = shape.rows, d = shape.cols;
  expect_rows(op, "dy", dy, n * d);
  if (dx.defined()) expect_rows(op, "dx", dx, n * d);
  expect_rows(op, "mean", mean, n);
  expect_rows(op, "rstd", rstd, n);
  for (const Arg& a : {Arg{"dw", dw}, Arg{"db", db}})
    if (a.t.defined()) {
      expect_f32(op, {a});
      expect_rows(op, a.name, a.t, d);
    }
  if (n == 0) return;
  VCHAT_DISPATCH(dt, T,
    const T *g = ptr<T>(dy), *xp = ptr<T>(x);
    const float *mu = ptr<float>(mean), *rs = ptr<float>(rstd);
    if (dw.defined())
      column_sums(c, n, d, ptr<float>(dw), [=] __device__(int64_t r, int64_t col) {
        return ld(g, r * d + col) * (ld(xp, r * d + col) - mu[r]) * rs[r];
      });
    if (db.defined())
      column_sums(c, n, d, ptr<float>(db), [=] __device__(int64_t r, int64_t col) { return ld(g, r * d + col); });
    if (dx.defined())
      layernorm_bwd_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream_of(c)>>>(g, xp, ptr<T>(w), mu, rs,
                                                                                  ptr<T>(dx), d);
  );
  CUDA_CHECK_LAUNCH();
}

}  // namespace vchat::cuda
