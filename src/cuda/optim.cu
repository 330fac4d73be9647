// Optimizer entry points: check the operands and launch the kernels of optim_kernels.cuh
// (the multi-tensor sum of squares as its plan lays it out, the clip coefficient, AdamW).
#include "cuda/optim_kernels.cuh"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

void sum_squares(const Context& c, const std::vector<Tensor>& xs, const Tensor& out) {
  const char* op = "cuda::sum_squares";
  expect_f32(op, {{"out", out}});
  VCHAT_CHECK(out.numel() == 1, op << ": out must hold one value, got " << shape_str(out.shape()));
  for (const Tensor& x : xs) expect_f32(op, {{"x", x}});
  std::vector<SumsqTensor> ts;
  for (const Tensor& x : xs) ts.push_back({ptr<float>(x), x.numel()});
  const SumsqPlan plan(ts);
  Tensor partial = Tensor::zeros({std::max<int64_t>(1, plan.partials)}, DType::f32, Device::cuda);
  for (size_t l = 0; l < plan.launches.size(); ++l) {
    const Chunk& ch = plan.launches[l];
    launch(c, sumsq_partial, ch.first[ch.count], kOptimThreads, 0, ch, ptr<float>(partial) + plan.at[l]);
  }
  launch(c, sumsq_finish, 1, kOptimThreads, 0, ptr<float>(partial), partial.numel(), ptr<float>(out));
}

void sum_into(const Context& c, const Tensor& x, const Tensor& acc) {
  const char* op = "cuda::sum_into";
  expect_f32(op, {{"x", x}, {"acc", acc}});
  VCHAT_CHECK(acc.numel() == 1, op << ": acc must hold one value, got " << shape_str(acc.shape()));
  launch(c, sum_into_kernel, 1, kOptimThreads, 0, ptr<float>(x), x.numel(), ptr<float>(acc));
}

void clip_scale(const Context& c, const Tensor& grad_sq, float max_norm, const Tensor& scale) {
  const char* op = "cuda::clip_scale";
  expect_f32(op, {{"grad_sq", grad_sq}, {"scale", scale}});
  VCHAT_CHECK(grad_sq.numel() == 1 && scale.numel() == 1, op << ": grad_sq and scale must hold one value each");
  launch(c, clip_scale_kernel, 1, 1, 0, ptr<float>(grad_sq), max_norm, ptr<float>(scale));
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
  const AdamBiasCorrection bc(a);
  launch(c, adamw_kernel, grid_for(n, kOptimThreads), kOptimThreads, 0, ptr<float>(param), ptr<float>(grad),
         ptr<float>(m), ptr<float>(v), working.defined() ? ptr<bf16>(working) : nullptr, n, a.lr, a.beta1, a.beta2,
         a.eps, a.weight_decay, bc.bc1, bc.bc2, grad_scale);
}

}  // namespace vchat::cuda
