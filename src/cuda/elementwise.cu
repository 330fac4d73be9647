// Elementwise kernels. Memory-bound, so what matters is coalesced access and one pass; the
// math runs in fp32 whatever the storage type. Grid-stride loops; out may alias an input
// where the op allows it, since each element is read before the same thread writes it.
#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

// Precise expf/erff, not the fast intrinsics: these are compared with the CPU ops.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

void same_numel(const char* op, std::initializer_list<Arg> args) {
  const int64_t n = args.begin()->t.numel();
  for (const Arg& a : args)
    VCHAT_CHECK(a.t.numel() == n, op << ": operand " << a.name << " " << shape_str(a.t.shape()) << " has "
                                     << a.t.numel() << " elements, " << args.begin()->name << " has " << n);
}

}  // namespace

void add(const Context& c, const Tensor& a, const Tensor& b, const Tensor& out) {
  const DType dt = expect_compute("cuda::add", {{"a", a}, {"b", b}, {"out", out}});
  same_numel("cuda::add", {{"out", out}, {"a", a}, {"b", b}});
  VCHAT_DISPATCH(dt, T,
    const T *pa = ptr<T>(a), *pb = ptr<T>(b);
    T* po = ptr<T>(out);
    launch_each(c, out.numel(), [=] __device__(int64_t i) { st(po, i, ld(pa, i) + ld(pb, i)); });
  );
}

void axpy(const Context& c, float alpha, const Tensor& x, const Tensor& y) {
  const DType dt = expect_compute("cuda::axpy", {{"y", y}, {"x", x}});
  same_numel("cuda::axpy", {{"y", y}, {"x", x}});
  VCHAT_DISPATCH(dt, T,
    T* py = ptr<T>(y);
    const T* px = ptr<T>(x);
    launch_each(c, y.numel(), [=] __device__(int64_t i) { st(py, i, ld(py, i) + alpha * ld(px, i)); });
  );
}

void scale(const Context& c, const Tensor& x, float alpha) {
  const DType dt = expect_compute("cuda::scale", {{"x", x}});
  VCHAT_DISPATCH(dt, T,
    T* p = ptr<T>(x);
    launch_each(c, x.numel(), [=] __device__(int64_t i) { st(p, i, ld(p, i) * alpha); });
  );
}

void fill(const Context& c, const Tensor& x, float value) {
  const DType dt = expect_compute("cuda::fill", {{"x", x}});
  VCHAT_DISPATCH(dt, T,
    T* p = ptr<T>(x);
    launch_each(c, x.numel(), [=] __device__(int64_t i) { st(p, i, value); });
  );
}

void cast(const Context& c, const Tensor& src, const Tensor& dst) {
  expect("cuda::cast", {"src", src}, {DType::f32, DType::bf16});
  expect("cuda::cast", {"dst", dst}, {DType::f32, DType::bf16});
  same_numel("cuda::cast", {{"dst", dst}, {"src", src}});
  VCHAT_DISPATCH(src.dtype(), S,
    const S* ps = ptr<S>(src);
    VCHAT_DISPATCH(dst.dtype(), D,
      D* pd = ptr<D>(dst);
      launch_each(c, dst.numel(), [=] __device__(int64_t i) { st(pd, i, ld(ps, i)); });
    );
  );
}

void add_bias(const Context& c, const Tensor& y, const Tensor& b) {
  const DType dt = expect_compute("cuda::add_bias", {{"y", y}, {"b", b}});
  const int64_t cols = b.numel();
  VCHAT_CHECK(cols > 0 && y.dim() >= 1 && y.size(-1) == cols,
              "cuda::add_bias: y " << shape_str(y.shape()) << " is not rows of b " << shape_str(b.shape()));
  VCHAT_DISPATCH(dt, T,
    T* py = ptr<T>(y);
    const T* pb = ptr<T>(b);
    launch_each(c, y.numel(), [=] __device__(int64_t i) { st(py, i, ld(py, i) + ld(pb, i % cols)); });
  );
}

void bias_grad(const Context& c, const Tensor& dy, const Tensor& db) {
  expect("cuda::bias_grad", {"dy", dy}, {DType::f32, DType::bf16});
  expect_f32("cuda::bias_grad", {{"db", db}});
  const int64_t cols = db.numel();
  VCHAT_CHECK(cols > 0 && dy.numel() % cols == 0,
              "cuda::bias_grad: dy " << shape_str(dy.shape()) << " is not rows of db " << shape_str(db.shape()));
  VCHAT_DISPATCH(dy.dtype(), T,
    const T* g = ptr<T>(dy);
    column_sums(c, dy.numel() / cols, cols, ptr<float>(db),
                [=] __device__(int64_t r, int64_t col) { return ld(g, r * cols + col); });
  );
}

void swiglu_fwd(const Context& c, const Tensor& gate, const Tensor& up, const Tensor& out) {
  const DType dt = expect_compute("cuda::swiglu_fwd", {{"gate", gate}, {"up", up}, {"out", out}});
  same_numel("cuda::swiglu_fwd", {{"out", out}, {"gate", gate}, {"up", up}});
  VCHAT_DISPATCH(dt, T,
    const T *g = ptr<T>(gate), *u = ptr<T>(up);
    T* o = ptr<T>(out);
    launch_each(c, out.numel(), [=] __device__(int64_t i) {
      const float x = ld(g, i);
      st(o, i, x * sigmoid(x) * ld(u, i));
    });
  );
}

// d silu(x) = s (1 + x (1 - s)), s = sigmoid(x).
void swiglu_bwd(const Context& c, const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate,
                const Tensor& dup) {
  const DType dt = expect_compute("cuda::swiglu_bwd",
                                  {{"dout", dout}, {"gate", gate}, {"up", up}, {"dgate", dgate}, {"dup", dup}});
  same_numel("cuda::swiglu_bwd", {{"dout", dout}, {"gate", gate}, {"up", up}, {"dgate", dgate}, {"dup", dup}});
  VCHAT_DISPATCH(dt, T,
    const T *d = ptr<T>(dout), *g = ptr<T>(gate), *u = ptr<T>(up);
    T *dg = ptr<T>(dgate), *du = ptr<T>(dup);
    launch_each(c, dout.numel(), [=] __device__(int64_t i) {
      const float x = ld(g, i), s = sigmoid(x), dy = ld(d, i), uu = ld(u, i);
      st(dg, i, dy * uu * s * (1.f + x * (1.f - s)));
      st(du, i, dy * x * s);
    });
  );
}

void gelu_fwd(const Context& c, ops::Activation act, const Tensor& x, const Tensor& y) {
  const DType dt = expect_compute("cuda::gelu_fwd", {{"x", x}, {"y", y}});
  same_numel("cuda::gelu_fwd", {{"y", y}, {"x", x}});
  const bool quick = act == ops::Activation::quick_gelu;
  VCHAT_DISPATCH(dt, T,
    const T* px = ptr<T>(x);
    T* py = ptr<T>(y);
    launch_each(c, x.numel(), [=] __device__(int64_t i) {
      const float a = ld(px, i);
      st(py, i, quick ? a * sigmoid(1.702f * a) : 0.5f * a * (1.f + erff(a * 0.70710678118654752f)));
    });
  );
}

void gelu_bwd(const Context& c, ops::Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx) {
  const DType dt = expect_compute("cuda::gelu_bwd", {{"dy", dy}, {"x", x}, {"dx", dx}});
  same_numel("cuda::gelu_bwd", {{"dx", dx}, {"dy", dy}, {"x", x}});
  const bool quick = act == ops::Activation::quick_gelu;
  VCHAT_DISPATCH(dt, T,
    const T *pd = ptr<T>(dy), *px = ptr<T>(x);
    T* po = ptr<T>(dx);
    launch_each(c, x.numel(), [=] __device__(int64_t i) {
      const float a = ld(px, i), d = ld(pd, i);
      float g;
      if (quick) {
        const float s = sigmoid(1.702f * a);
        g = s + 1.702f * a * s * (1.f - s);
      } else {
        const float cdf = 0.5f * (1.f + erff(a * 0.70710678118654752f));
        g = cdf + a * 0.39894228040143268f * expf(-0.5f * a * a);
      }
      st(po, i, d * g);
    });
  );
}

}  // namespace vchat::cuda
