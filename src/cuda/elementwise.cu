// Elementwise ops: operand checks and launches. The per-element bodies are the functors of
// elementwise_kernels.cuh, run by kernels.cuh's launch_each (one grid-stride pass).
#include "cuda/elementwise_kernels.cuh"
#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

void same_numel(const char* op, std::initializer_list<Arg> args) {
  const int64_t n = args.begin()->t.numel();
  for (const Arg& a : args)
    VCHAT_CHECK(a.t.numel() == n, op << ": operand " << a.name << " " << shape_str(a.t.shape()) << " has "
                                     << a.t.numel() << " elements, " << args.begin()->name << " has " << n);
}

}  // namespace

// clang-format off
void add(const Context& c, const Tensor& a, const Tensor& b, const Tensor& out) {
  const DType dt = expect_compute("cuda::add", {{"a", a}, {"b", b}, {"out", out}});
  same_numel("cuda::add", {{"out", out}, {"a", a}, {"b", b}});
  VCHAT_DISPATCH(dt, T,
    launch_each(c, out.numel(), AddEach<T>{ptr<T>(a), ptr<T>(b), ptr<T>(out)});
  );
}

void axpy(const Context& c, float alpha, const Tensor& x, const Tensor& y) {
  const DType dt = expect_compute("cuda::axpy", {{"y", y}, {"x", x}});
  same_numel("cuda::axpy", {{"y", y}, {"x", x}});
  VCHAT_DISPATCH(dt, T,
    launch_each(c, y.numel(), AxpyEach<T>{alpha, ptr<T>(x), ptr<T>(y)});
  );
}

void scale(const Context& c, const Tensor& x, float alpha) {
  const DType dt = expect_compute("cuda::scale", {{"x", x}});
  VCHAT_DISPATCH(dt, T,
    launch_each(c, x.numel(), ScaleEach<T>{ptr<T>(x), alpha});
  );
}

void fill(const Context& c, const Tensor& x, float value) {
  const DType dt = expect_compute("cuda::fill", {{"x", x}});
  VCHAT_DISPATCH(dt, T,
    launch_each(c, x.numel(), FillEach<T>{ptr<T>(x), value});
  );
}

void cast(const Context& c, const Tensor& src, const Tensor& dst) {
  expect("cuda::cast", {"src", src}, {DType::f32, DType::bf16});
  expect("cuda::cast", {"dst", dst}, {DType::f32, DType::bf16});
  same_numel("cuda::cast", {{"dst", dst}, {"src", src}});
  VCHAT_DISPATCH(src.dtype(), S,
    VCHAT_DISPATCH(dst.dtype(), D,
      launch_each(c, dst.numel(), CastEach<S, D>{ptr<S>(src), ptr<D>(dst)});
    );
  );
}

void add_bias(const Context& c, const Tensor& y, const Tensor& b) {
  const DType dt = expect_compute("cuda::add_bias", {{"y", y}, {"b", b}});
  const int64_t cols = b.numel();
  VCHAT_CHECK(cols > 0 && y.dim() >= 1 && y.size(-1) == cols,
              "cuda::add_bias: y " << shape_str(y.shape()) << " is not rows of b " << shape_str(b.shape()));
  VCHAT_DISPATCH(dt, T,
    launch_each(c, y.numel(), AddBiasEach<T>{ptr<T>(y), ptr<T>(b), cols});
  );
}

void bias_grad(const Context& c, const Tensor& dy, const Tensor& db) {
  expect("cuda::bias_grad", {"dy", dy}, {DType::f32, DType::bf16});
  expect_f32("cuda::bias_grad", {{"db", db}});
  const int64_t cols = db.numel();
  VCHAT_CHECK(cols > 0 && dy.numel() % cols == 0,
              "cuda::bias_grad: dy " << shape_str(dy.shape()) << " is not rows of db " << shape_str(db.shape()));
  VCHAT_DISPATCH(dy.dtype(), T,
    column_sums(c, dy.numel() / cols, cols, ptr<float>(db), BiasGradTerm<T>{ptr<T>(dy), cols});
  );
}

void swiglu_fwd(const Context& c, const Tensor& gate, const Tensor& up, const Tensor& out) {
  const DType dt = expect_compute("cuda::swiglu_fwd", {{"gate", gate}, {"up", up}, {"out", out}});
  same_numel("cuda::swiglu_fwd", {{"out", out}, {"gate", gate}, {"up", up}});
  VCHAT_DISPATCH(dt, T,
    launch_each(c, out.numel(), SwigluFwdEach<T>{ptr<T>(gate), ptr<T>(up), ptr<T>(out)});
  );
}

void swiglu_bwd(const Context& c, const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate,
                const Tensor& dup) {
  const DType dt = expect_compute("cuda::swiglu_bwd",
                                  {{"dout", dout}, {"gate", gate}, {"up", up}, {"dgate", dgate}, {"dup", dup}});
  same_numel("cuda::swiglu_bwd", {{"dout", dout}, {"gate", gate}, {"up", up}, {"dgate", dgate}, {"dup", dup}});
  VCHAT_DISPATCH(dt, T,
    launch_each(c, dout.numel(),
                SwigluBwdEach<T>{ptr<T>(dout), ptr<T>(gate), ptr<T>(up), ptr<T>(dgate), ptr<T>(dup)});
  );
}

void gelu_fwd(const Context& c, ops::Activation act, const Tensor& x, const Tensor& y) {
  const DType dt = expect_compute("cuda::gelu_fwd", {{"x", x}, {"y", y}});
  same_numel("cuda::gelu_fwd", {{"y", y}, {"x", x}});
  const bool quick = act == ops::Activation::quick_gelu;
  VCHAT_DISPATCH(dt, T,
    launch_each(c, x.numel(), GeluFwdEach<T>{quick, ptr<T>(x), ptr<T>(y)});
  );
}

void gelu_bwd(const Context& c, ops::Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx) {
  const DType dt = expect_compute("cuda::gelu_bwd", {{"dy", dy}, {"x", x}, {"dx", dx}});
  same_numel("cuda::gelu_bwd", {{"dx", dx}, {"dy", dy}, {"x", x}});
  const bool quick = act == ops::Activation::quick_gelu;
  VCHAT_DISPATCH(dt, T,
    launch_each(c, x.numel(), GeluBwdEach<T>{quick, ptr<T>(dy), ptr<T>(x), ptr<T>(dx)});
  );
}

// clang-format on

}  // namespace vchat::cuda
