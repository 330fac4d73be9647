// Cross-entropy, its vocabulary-parallel pieces and argmax: the entry points, which check
// the operands and launch the kernels of loss_kernels.cuh.
#include "cuda/loss_kernels.cuh"

#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

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
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, ce_fwd_kernel<T>, static_cast<unsigned>(N), kLossThreads, 0, ptr<T>(logits), ptr<int32_t>(targets), V,
           ptr<float>(lse), ptr<float>(row_loss));
  );
  // clang-format on
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
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, ce_bwd_kernel<T>, static_cast<unsigned>(N), kLossThreads, 0, ptr<T>(logits), ptr<int32_t>(targets),
           ptr<float>(lse), scale, ptr<T>(dlogits), V, vocab_begin);
  );
  // clang-format on
}

void ce_row_max(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& row_max) {
  const char* op = "cuda::ce_row_max";
  const DType dt = expect_compute(op, {{"logits", logits}});
  const auto [N, V] = loss_shape(op, logits, targets);
  expect_n(op, {{"row_max", row_max}}, N);
  if (N == 0) return;
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, ce_max_kernel<T>, static_cast<unsigned>(N), kLossThreads, 0, ptr<T>(logits), ptr<int32_t>(targets), V,
           ptr<float>(row_max));
  );
  // clang-format on
}

void ce_row_sumexp(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& row_max,
                   int64_t vocab_begin, const Tensor& sumexp, const Tensor& target_logit) {
  const char* op = "cuda::ce_row_sumexp";
  const DType dt = expect_compute(op, {{"logits", logits}});
  const auto [N, V] = loss_shape(op, logits, targets);
  expect_n(op, {{"row_max", row_max}, {"sumexp", sumexp}, {"target_logit", target_logit}}, N);
  if (N == 0) return;
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, ce_sumexp_kernel<T>, static_cast<unsigned>(N), kLossThreads, 0, ptr<T>(logits), ptr<int32_t>(targets),
           ptr<float>(row_max), V, vocab_begin, ptr<float>(sumexp), ptr<float>(target_logit));
  );
  // clang-format on
}

void ce_finish(const Context& c, const Tensor& row_max, const Tensor& sumexp, const Tensor& target_logit,
               const Tensor& targets, const Tensor& lse, const Tensor& row_loss) {
  const char* op = "cuda::ce_finish";
  expect(op, {"targets", targets}, {DType::i32});
  const int64_t N = targets.numel();
  expect_n(op, {{"row_max", row_max}, {"sumexp", sumexp}, {"target_logit", target_logit}, {"lse", lse},
                {"row_loss", row_loss}},
           N);
  if (N == 0) return;
  launch(c, ce_finish_kernel, static_cast<unsigned>((N + 255) / 256), 256, 0, ptr<float>(row_max), ptr<float>(sumexp),
         ptr<float>(target_logit), ptr<int32_t>(targets), N, ptr<float>(lse), ptr<float>(row_loss));
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
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch(c, argmax_kernel<T>, static_cast<unsigned>(N), kLossThreads, 0, ptr<T>(logits), V, ptr<int32_t>(index),
           ptr<float>(value));
  );
  // clang-format on
}

}  // namespace vchat::cuda
