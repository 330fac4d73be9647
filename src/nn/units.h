// Parameter units: the groups of parameters a layer uses together (a ViT layer, the
// projection, the embedding, one decoder block, the final norm with lm_head). ZeRO-3 keeps
// each unit sharded over the data-parallel group and gathers it only around its use; the
// model announces each use through UnitHooks (ZeRO-2 keeps every unit gathered, and uses the
// hooks to reduce each unit's gradient in its backward; ZeRO 0-1 may, for the same).
#pragma once
#include <string>
#include <vector>

#include "nn/params.h"

namespace vchat {

struct ParamUnit {
  std::string name;
  std::vector<Param*> params;  // this rank's Params of the unit (tensor-parallel slices)
  // Whether backward reads the weights: not the embedding's (token ids only), nor a frozen
  // encoder's (no backward at all). ZeRO-3 gathers (and prefetches) only these for backward.
  bool backward_needs_weights = true;
};

// Called by the model around every use of a unit, in the order of use. Between
// before_forward(u) and after_forward(u) every Param of unit u has its full (TP-local)
// value; between before_backward(u) and after_backward(u) its value (when
// backward_needs_weights) and, for trainable Params, a zeroed gradient buffer that the
// backward accumulates into. after_backward hands that gradient on (ZeRO-3:
// reduce-scatter into the owner's shard) and frees it.
class UnitHooks {
 public:
  virtual ~UnitHooks() = default;
  virtual void before_forward(int unit) = 0;
  virtual void after_forward(int unit) = 0;
  virtual void before_backward(int unit) = 0;
  virtual void after_backward(int unit) = 0;
};

}  // namespace vchat

namespace vchat {

// A layer's view of the hooks: unit `base + i` for its i-th unit; no-ops without hooks.
struct HookCursor {
  UnitHooks* hooks = nullptr;
  int base = 0;
  void before_forward(int i) const {
    if (hooks) hooks->before_forward(base + i);
  }
  void after_forward(int i) const {
    if (hooks) hooks->after_forward(base + i);
  }
  void before_backward(int i) const {
    if (hooks) hooks->before_backward(base + i);
  }
  void after_backward(int i) const {
    if (hooks) hooks->after_backward(base + i);
  }
};

}  // namespace vchat
