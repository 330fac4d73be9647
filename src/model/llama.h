// LLaMA-2 decoder layer: RMSNorm → GQA attention (rotary, MMCA or causal) → residual →
// RMSNorm → SwiGLU MLP → residual. Forward saves what backward needs in a per-micro-batch
// cache owned by the caller, so a pipeline stage can keep several micro-batches in flight.
#pragma once
#include <string>

#include "model/config.h"
#include "model/kv_cache.h"
#include "nn/linear.h"
#include "nn/norm.h"

namespace vchat {

// The tensor-parallel group as the decoder sees it (DESIGN.md §5).
struct TensorParallel {
  Comm* tp = nullptr;  // nullptr: one rank
  // With fewer KV heads than ranks each KV head is replicated on tp / n_kv_heads ranks:
  // the group of ranks sharing this rank's head (nullptr otherwise).
  Comm* kv_replicas = nullptr;
  int rank() const;
  int size() const;
  // f's backward / g's forward: sums a partial activation over the group (no-op at size 1).
  void all_reduce(const Tensor& t) const;
};

struct AttentionCache {
  LinearCache q, k, v, o;
  Tensor qr, kr, vv;  // q, k after rotary and v, as [B, L, heads, hd]
  Tensor att;         // attention output [B, L, heads, hd] (the o_proj input; no copy)
  Tensor saved;       // what the attention op keeps for backward (ops::attention_fwd)
};

class LlamaAttention {
 public:
  LlamaAttention() = default;
  LlamaAttention(ParamStore& store, const std::string& prefix, const LlmConfig& cfg, const TensorParallel& tp);
  void add_lora(ParamStore& store, int64_t rank, float alpha);
  // x [B*L, H] → [B*L, H]
  Tensor forward(const ExecContext& ex, const Tensor& x, const Tensor& modality, ops::AttnMode mode, int64_t B,
                 int64_t L, AttentionCache& c) const;
  void backward(const ExecContext& ex, const Tensor& dy, const Tensor& modality, ops::AttnMode mode, AttentionCache& c,
                const Tensor& dx) const;
  // Generation: x [n, H] are positions position..position+n-1 of one sequence; their keys and
  // values go into `kv` rows [position, position+n), and they attend over every row so far
  // (`modality` [position+n]). Forward only.
  Tensor decode(const ExecContext& ex, const Tensor& x, KvCache::Layer& kv, const Tensor& modality, ops::AttnMode mode,
                int64_t position) const;

 private:
  Linear q_, k_, v_, o_;
  TensorParallel tp_;
  int64_t n_heads_ = 0, n_kv_ = 0, hd_ = 0;  // heads held by this rank
  double theta_ = 10000.0;
};

struct MlpCache {
  LinearCache gate, up, down;
  Tensor g, u;
};

class LlamaMLP {
 public:
  LlamaMLP() = default;
  LlamaMLP(ParamStore& store, const std::string& prefix, const LlmConfig& cfg, const TensorParallel& tp);
  void add_lora(ParamStore& store, int64_t rank, float alpha);
  Tensor forward(const ExecContext& ex, const Tensor& x, MlpCache& c) const;
  void backward(const ExecContext& ex, const Tensor& dy, MlpCache& c, const Tensor& dx) const;

 private:
  Linear gate_, up_, down_;
  TensorParallel tp_;
};

// What a decoder block keeps from forward for backward (--recompute).
enum class Recompute : uint8_t {
  none,   // every activation backward reads
  block,  // only the block's input; backward runs the block's forward again first
};
Recompute parse_recompute(const std::string& s);  // "none" | "block"; throws ConfigError

struct LlamaBlockCache {
  // Recompute::block keeps only these; backward rebuilds the rest.
  Tensor input;
  int64_t B = 0, L = 0;
  bool recompute = false;
  NormCache norm1, norm2;
  AttentionCache attn;
  MlpCache mlp;
};

class LlamaBlock {
 public:
  LlamaBlock() = default;
  LlamaBlock(ParamStore& store, const std::string& prefix, const LlmConfig& cfg, const TensorParallel& tp = {});
  void add_lora(ParamStore& store, int64_t rank, float alpha);
  // With Recompute::block the activations die here and backward recomputes them: the same
  // ops on the same input, so its gradients are bit-identical to a stored run's (a TP
  // block repeats its forward all-reduces, in the same order on every rank).
  Tensor forward(const ExecContext& ex, const Tensor& x, const Tensor& modality, ops::AttnMode mode, int64_t B,
                 int64_t L, LlamaBlockCache& c, Recompute recompute = Recompute::none) const;
  // Generation (LlamaAttention::decode): the same computation for n new positions.
  Tensor decode(const ExecContext& ex, const Tensor& x, KvCache::Layer& kv, const Tensor& modality, ops::AttnMode mode,
                int64_t position) const;
  // dy is the gradient of the block output; returns the gradient of its input.
  Tensor backward(const ExecContext& ex, const Tensor& dy, const Tensor& modality, ops::AttnMode mode,
                  LlamaBlockCache& c) const;

 private:
  RMSNorm norm1_, norm2_;
  LlamaAttention attn_;
  LlamaMLP mlp_;
};

}  // namespace vchat
