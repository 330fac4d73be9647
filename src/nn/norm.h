// Normalization layers: RMSNorm (LLaMA) and LayerNorm (CLIP, projection).
#pragma once
#include <string>

#include "nn/params.h"

namespace vchat {

struct NormCache {
  Tensor x, mean, rstd;
};

class RMSNorm {
 public:
  RMSNorm() = default;
  RMSNorm(ParamStore& store, const std::string& name, int64_t dim, float eps);
  Tensor forward(const ExecContext& ex, const Tensor& x, NormCache& cache) const;
  // A pre-norm residual step in one pass: x += residual in place, then the norm of the sum
  // (what the cache keeps as the norm's input).
  Tensor add_forward(const ExecContext& ex, const Tensor& x, const Tensor& residual, NormCache& cache) const;
  // dx overwritten; with residual_grad, dx = the norm's input gradient + residual_grad (the
  // gradient that reached the sum by the residual path; it may alias dx).
  void backward(const ExecContext& ex, const Tensor& dy, const NormCache& cache, const Tensor& dx,
                const Tensor& residual_grad = Tensor()) const;

 private:
  Param* w_ = nullptr;
  float eps_ = 1e-5f;
};

class LayerNorm {
 public:
  LayerNorm() = default;
  LayerNorm(ParamStore& store, const std::string& name, int64_t dim, float eps);
  Tensor forward(const ExecContext& ex, const Tensor& x, NormCache& cache) const;
  void backward(const ExecContext& ex, const Tensor& dy, const NormCache& cache,
                const Tensor& dx) const;  // dx may be undefined

 private:
  Param *w_ = nullptr, *b_ = nullptr;
  float eps_ = 1e-5f;
};

}  // namespace vchat
