// Linear layer y = x Wᵀ + b, with an optional LoRA adapter y += s·(x Aᵀ) Bᵀ, laid out over
// the tensor-parallel group as Megatron does (DESIGN.md §5):
//   ColumnParallel: W split by output rows; x replicated, y a slice of the full output.
//     The backward's dx is a partial sum; the caller all-reduces it once for all the
//     column-parallel layers sharing that input (Megatron's "f": identity forward,
//     all-reduce backward) — q/k/v, or gate/up.
//   RowParallel: W split by input columns; x a slice, y this rank's partial sum, which
//     the caller all-reduces (Megatron's "g": all-reduce forward, identity backward).
// The layer knows no communicator: both mappings belong to the block that owns the
// group (model/llama.h's TensorParallel), which sums once for the layers sharing them.
// LoRA follows its base layer: the half that touches the split dimension is split the
// same way (B by rows for column, A by columns for row), the other half is replicated and
// its gradient, computed from the local slice only, is summed over the group at the update
// (Param::grad_sum, set from the parameter table, model/param_table.h). Frozen weights get
// no weight-gradient GEMM; dx always flows.
#pragma once
#include <string>

#include "nn/params.h"

namespace vchat {

struct LinearCache {
  Tensor x;   // input, for dW = dyᵀ x
  Tensor xa;  // LoRA: x Aᵀ [N, r]
};

struct TpLayout {
  enum Kind { replicated, column, row } kind = replicated;
  int64_t index = 0, count = 1;  // this rank holds part `index` of `count` (column: of rows; row: of columns)
  static TpLayout column_of(int64_t index, int64_t count) { return {column, index, count}; }
  static TpLayout row_of(int64_t index, int64_t count) { return {row, index, count}; }
};

class Linear {
 public:
  Linear() = default;
  // Registers `<name>.weight` (full shape [out, in]; this rank's part per `layout`) and
  // `<name>.bias` [out] when bias (not allowed row-parallel: it would be added tp times).
  Linear(ParamStore& store, const std::string& name, int64_t in, int64_t out, bool bias, TpLayout layout = {});
  // Registers `<name>.lora_A` [r, in] and `<name>.lora_B` [out, r]; scale = alpha / r.
  void add_lora(ParamStore& store, int64_t rank, float alpha);

  Tensor forward(const ExecContext& ex, const Tensor& x, LinearCache& cache) const;
  // Weight gradients accumulate into the trainable params; dx is written (beta=0) or
  // accumulated (beta=1) when defined (column-parallel: this rank's partial sum).
  void backward(const ExecContext& ex, const Tensor& dy, const LinearCache& cache, const Tensor& dx,
                float beta = 0.f) const;

  int64_t in() const { return in_; }    // this rank's input width
  int64_t out() const { return out_; }  // this rank's output width
  Param* weight() const { return w_; }

 private:
  Param *w_ = nullptr, *b_ = nullptr, *lora_a_ = nullptr, *lora_b_ = nullptr;
  std::string name_;
  int64_t in_ = 0, out_ = 0, full_in_ = 0, full_out_ = 0;
  float lora_scale_ = 0.f;
  TpLayout layout_;
};

}  // namespace vchat
