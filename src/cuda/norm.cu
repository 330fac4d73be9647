// RMSNorm and LayerNorm over the last dim: the entry points, which check the operands and
// launch the kernels of norm_kernels.cuh (one block per row) and, for the weight and bias
// gradients, the deterministic column sums.
#include "cuda/norm_kernels.cuh"

#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

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
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, rmsnorm_fwd_kernel<T>, static_cast<unsigned>(n), norm_threads(d), 0, ptr<T>(x),
           static_cast<const T*>(nullptr), static_cast<T*>(nullptr), ptr<T>(w), eps, ptr<T>(y), ptr<float>(rstd), d);
  );
  // clang-format on
}

void add_rmsnorm_fwd(const Context& c, const Tensor& x, const Tensor& residual, const Tensor& sum, const Tensor& w,
                     float eps, const Tensor& y, const Tensor& rstd) {
  const char* op = "cuda::add_rmsnorm_fwd";
  const DType dt = expect_compute(op, {{"x", x}, {"residual", residual}, {"sum", sum}, {"w", w}, {"y", y}});
  expect_f32(op, {{"rstd", rstd}});
  const RowsCols shape = norm_shape(op, x, w);
  const int64_t n = shape.rows, d = shape.cols;
  expect_rows(op, "residual", residual, n * d);
  expect_rows(op, "sum", sum, n * d);
  expect_rows(op, "y", y, n * d);
  expect_rows(op, "rstd", rstd, n);
  if (n == 0) return;
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, rmsnorm_fwd_kernel<T>, static_cast<unsigned>(n), norm_threads(d), 0, ptr<T>(x), ptr<T>(residual),
           ptr<T>(sum), ptr<T>(w), eps, ptr<T>(y), ptr<float>(rstd), d);
  );
  // clang-format on
}

void rmsnorm_bwd(const Context& c, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                 const Tensor& dx, const Tensor& dw, const Tensor& residual_grad) {
  const char* op = "cuda::rmsnorm_bwd";
  const DType dt = expect_compute(op, {{"dy", dy}, {"x", x}, {"w", w}});
  if (dx.defined()) expect_compute(op, {{"dy", dy}, {"dx", dx}});  // undefined: not wanted
  VCHAT_CHECK(dx.defined() || !residual_grad.defined(), op << ": residual_grad is added to dx, which is not given");
  if (residual_grad.defined()) expect_compute(op, {{"dy", dy}, {"residual_grad", residual_grad}});
  expect_f32(op, {{"rstd", rstd}});
  const RowsCols shape = norm_shape(op, x, w);
  const int64_t n = shape.rows, d = shape.cols;
  expect_rows(op, "dy", dy, n * d);
  if (dx.defined()) expect_rows(op, "dx", dx, n * d);
  if (residual_grad.defined()) expect_rows(op, "residual_grad", residual_grad, n * d);
  expect_rows(op, "rstd", rstd, n);
  if (dw.defined()) {
    expect_f32(op, {{"dw", dw}});
    expect_rows(op, "dw", dw, d);
  }
  if (n == 0) return;
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    const T *g = ptr<T>(dy), *xp = ptr<T>(x);
    const float* rs = ptr<float>(rstd);
    if (dw.defined())  // before dx: dx may alias dy
      column_sums(c, n, d, ptr<float>(dw), RmsNormDw<T>{g, xp, rs, d});
    if (dx.defined())
      launch(c, rmsnorm_bwd_kernel<T>, static_cast<unsigned>(n), norm_threads(d), 0, g, xp, ptr<T>(w), rs,
             residual_grad.defined() ? ptr<T>(residual_grad) : nullptr, ptr<T>(dx), d);
  );
  // clang-format on
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
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, layernorm_fwd_kernel<T>, static_cast<unsigned>(n), norm_threads(d), 0, ptr<T>(x), ptr<T>(w),
           b.defined() ? ptr<T>(b) : nullptr, eps, ptr<T>(y), ptr<float>(mean), ptr<float>(rstd), d);
  );
  // clang-format on
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
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    const T *g = ptr<T>(dy), *xp = ptr<T>(x);
    const float *mu = ptr<float>(mean), *rs = ptr<float>(rstd);
    if (dw.defined())
      column_sums(c, n, d, ptr<float>(dw), LayerNormDw<T>{g, xp, mu, rs, d});
    if (db.defined())
      column_sums(c, n, d, ptr<float>(db), LayerNormDb<T>{g, d});
    if (dx.defined())
      launch(c, layernorm_bwd_kernel<T>, static_cast<unsigned>(n), norm_threads(d), 0, g, xp, ptr<T>(w), mu, rs,
             ptr<T>(dx), d);
  );
  // clang-format on
}

}  // namespace vchat::cuda
