// The generation cache (DESIGN.md §10): per decoder layer, the keys (after rotary) and values
// of every position of the conversation so far, and each position's modality, so that MMCA
// at generation time is exactly training's (a new text token attends to earlier text and
// earlier images with separate softmaxes; an image token only to itself). Each round then
// runs only its new positions through the model (VisualChatModel::extend).
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "tensor.h"

namespace vchat {

struct KvCache {
  struct Layer {
    Tensor k, v;  // [capacity, n_kv_heads, head_dim], where the model runs, in its compute dtype
  };
  std::vector<Layer> layers;
  std::vector<uint8_t> modality;  // ops::Modality per position, [length]
  int64_t length = 0;             // positions held

  int64_t capacity() const { return layers.empty() || !layers[0].k.defined() ? 0 : layers[0].k.size(0); }
  // Forget the conversation (the buffers stay for the next one).
  void clear() {
    length = 0;
    modality.clear();
  }
  // Room for `total` positions in `n_layers` layers on `device` in `dtype`: grows the
  // buffers (at least doubling, keeping what they hold).
  void reserve(int64_t total, int64_t n_layers, int64_t n_kv, int64_t head_dim, Device device = Device::cpu,
               DType dtype = DType::f32) {
    const bool same_kind = layers.empty() || !layers[0].k.defined() ||
                           (layers[0].k.device() == device && layers[0].k.dtype() == dtype);
    if (!same_kind && length > 0)
      throw std::logic_error("KvCache: a conversation held on another device or dtype than the model's (clear it first)");
    if (same_kind && static_cast<int64_t>(layers.size()) == n_layers && capacity() >= total) return;
    const int64_t cap = std::max<int64_t>(total, 2 * capacity());
    layers.resize(static_cast<size_t>(n_layers));
    for (Layer& l : layers) {
      for (Tensor* t : {&l.k, &l.v}) {
        Tensor grown = Tensor::empty({cap, n_kv, head_dim}, dtype, device);
        if (same_kind && t->defined() && length > 0) grown.slice(0, 0, length).copy_from(t->slice(0, 0, length));
        *t = grown;
      }
    }
  }
};

}  // namespace vchat
