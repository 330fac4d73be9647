// The model's constraints on the grid: Megatron's even splits and at least one layer and
// one micro-batch per pipeline stage.
#include "model/grid_rules.h"

#include <cstdint>
#include <sstream>
#include <string>

namespace vchat {

namespace {

// "<prefix> of model 'tiny'", or nothing for a model without a name.
std::string of_model(const ModelConfig& m) { return m.name.empty() ? "" : " of model '" + m.name + "'"; }

}  // namespace

void validate_grid(const GridShape& s, const ModelConfig& m, int micro_batches) {
  require_positive(s.tp, "--tp");
  require_positive(s.pp, "--pp");
  require_positive(s.dp, "dp");
  require_positive(micro_batches, "--micro-batches");
  const LlmConfig& llm = m.llm;
  const std::string model = of_model(m);
  const std::string tp = "--tp=" + std::to_string(s.tp);

  // "--tp=3 does not divide llm.n_heads=8 of model 'tiny'".
  auto must_divide = [&](int64_t value, const char* key, const char* why) {
    if (value % s.tp == 0) return;
    std::ostringstream os;
    os << tp << " does not divide " << key << "=" << value << model << ": " << why;
    throw ConfigError(os.str());
  };
  // Megatron tensor parallelism splits every sharded dimension evenly (no padding):
  // attention by whole heads (q/k/v column-parallel, o row-parallel), the MLP by
  // intermediate columns (gate/up column-parallel, down row-parallel), and the embedding,
  // lm_head and cross-entropy by vocabulary rows.
  must_divide(llm.n_heads, "llm.n_heads", "each tensor-parallel rank holds whole attention heads");
  if (llm.n_kv_heads >= s.tp) {
    // Enough KV heads to share out: each rank holds n_kv_heads/tp of them.
    must_divide(llm.n_kv_heads, "llm.n_kv_heads", "each tensor-parallel rank holds whole KV heads");
  } else if (llm.n_kv_heads > 0 && s.tp % llm.n_kv_heads != 0) {
    // Fewer KV heads than ranks: each head is replicated on tp/n_kv_heads ranks, which needs
    // the ranks to come in equal groups per head.
    std::ostringstream os;
    os << "llm.n_kv_heads=" << llm.n_kv_heads << " does not divide " << tp << model
       << ": with fewer KV heads than tensor-parallel ranks each KV head is replicated on an equal"
       << " number of ranks";
    throw ConfigError(os.str());
  }
  must_divide(llm.vocab_size, "llm.vocab_size", "the embedding, lm_head and loss are split by vocabulary rows");
  must_divide(llm.intermediate, "llm.intermediate", "the MLP is split by intermediate columns");
  // No constraint from the vision encoder: it runs image-parallel across the TP group (each
  // TP rank encodes whole images, DESIGN.md §5), so vision.n_heads, vision.width and
  // vision.intermediate are never split.

  if (llm.n_layers < s.pp) {
    std::ostringstream os;
    os << "--pp=" << s.pp << " exceeds llm.n_layers=" << llm.n_layers << model
       << ": every pipeline stage needs at least one layer";
    throw ConfigError(os.str());
  }
  if (s.pp > 1 && micro_batches < s.pp) {
    std::ostringstream os;
    os << "--micro-batches=" << micro_batches << " is fewer than --pp=" << s.pp
       << " stages: the 1F1B schedule needs at least one micro-batch per stage";
    throw ConfigError(os.str());
  }
}

}  // namespace vchat
