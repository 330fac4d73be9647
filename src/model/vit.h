// CLIP vision encoder (HF CLIPVisionModel): conv patch embedding (as a GEMM over extracted
// patches), CLS token, learned positions, pre_layrnorm, pre-LN blocks with non-causal MHA
// and a quick_gelu/gelu MLP. Only the layers up to the selected feature layer are built.
#pragma once
#include <string>
#include <vector>

#include "model/config.h"
#include "nn/linear.h"
#include "nn/norm.h"
#include "nn/units.h"

namespace vchat {

struct VitLayerCache {
  NormCache ln1, ln2;
  LinearCache q, k, v, o, fc1, fc2;
  Tensor qh, kh, vh, att, saved, pre_act;  // saved: the attention op's (ops::attention_fwd)
};

class VitLayer {
 public:
  VitLayer() = default;
  VitLayer(ParamStore& store, const std::string& prefix, const VisionConfig& cfg);
  Tensor forward(const ExecContext& ex, const Tensor& x, int64_t n_img, int64_t T,
                 VitLayerCache& c) const;  // x [n_img*T, W]
  Tensor backward(const ExecContext& ex, const Tensor& dy, VitLayerCache& c) const;

 private:
  LayerNorm ln1_, ln2_;
  Linear q_, k_, v_, o_, fc1_, fc2_;
  int64_t heads_ = 0, hd_ = 0;
  ops::Activation act_ = ops::Activation::quick_gelu;
};

struct VisionCache {
  LinearCache patch;
  NormCache pre;
  std::vector<VitLayerCache> layers;
  int64_t n_img = 0;
};

class VisionEncoder {
 public:
  VisionEncoder() = default;
  VisionEncoder(ParamStore& store, const VisionConfig& cfg);
  // pixels [N, 3, S, S] → features [N * tokens_per_image, W]. N may be 0 (an image-parallel
  // rank without images): the hooks are still called, so ZeRO-3 peers stay in step.
  // Units (for the hooks): 0 = embeddings and pre-norm, 1 + i = layer i.
  Tensor forward(const ExecContext& ex, const Tensor& pixels, VisionCache& c, const HookCursor& hooks = {}) const;
  // Accumulates gradients of trainable encoder weights (pixels get none).
  void backward(const ExecContext& ex, const Tensor& dfeatures, VisionCache& c, const HookCursor& hooks = {}) const;
  int n_units() const { return 1 + static_cast<int>(layers_.size()); }

 private:
  VisionConfig cfg_;
  Linear patch_;
  Param *cls_ = nullptr, *pos_ = nullptr;
  LayerNorm pre_;
  std::vector<VitLayer> layers_;
};

}  // namespace vchat
