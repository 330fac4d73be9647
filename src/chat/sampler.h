// Choosing the next token from logits (vchat-chat): greedy, or sampling with temperature,
// top-k and top-p, after a repetition penalty, from a seeded generator. The order and the
// definitions are transformers' (RepetitionPenalty → Temperature → TopK → TopP), so settings
// carry over from other tools.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "tensor.h"

namespace vchat::chat {

struct SamplingOptions {
  float temperature = 0.f;          // 0: greedy (argmax, the first on ties)
  int top_k = 0;                    // keep the k most likely (0: all)
  float top_p = 1.f;                // keep the smallest set whose probability reaches p (1: all)
  float repetition_penalty = 1.f;   // > 1 discourages tokens already in the conversation
  uint64_t seed = 0;
  int max_new_tokens = 256;
};

// Throws std::invalid_argument naming the option for a value out of range.
void validate(const SamplingOptions& o);

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& o);
  // The next token for `logits` [V] (host f32); `history`: the conversation's text tokens
  // (the repetition penalty's set).
  int32_t next(const Tensor& logits, const std::vector<int32_t>& history);
  const SamplingOptions& options() const { return opt_; }

 private:
  SamplingOptions opt_;
  std::mt19937_64 rng_;
};

}  // namespace vchat::chat
