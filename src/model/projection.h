// The paper's "baseline" projection: Linear(vision width → LLM hidden) then LayerNorm.
#pragma once
#include "model/config.h"
#include "nn/linear.h"
#include "nn/norm.h"

namespace vchat {

struct ProjectionCache {
  LinearCache linear;
  NormCache norm;
};

class Projection {
 public:
  Projection() = default;
  Projection(ParamStore& store, int64_t vision_width, int64_t hidden, const ProjectionConfig& cfg);
  Tensor forward(const ExecContext& ex, const Tensor& features, ProjectionCache& c) const;
  // dfeatures may be undefined when the encoder below is frozen.
  void backward(const ExecContext& ex, const Tensor& dy, ProjectionCache& c, const Tensor& dfeatures) const;

 private:
  Linear linear_;
  LayerNorm norm_;
};

}  // namespace vchat
