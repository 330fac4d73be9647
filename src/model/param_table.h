// The parameter table: every fact about every parameter of the one-rank model, in one
// declarative list built from the model config (docs/MODEL.md has the names and shapes).
// Everything else derives from it instead of rediscovering facts from name prefixes:
//   - which slice a tensor-parallel rank holds (ShardSpec) and which ranks replicate it,
//   - the initial values (init_params),
//   - the ZeRO-3 unit and the pipeline stage that owns it,
//   - whether `--train default|lora|full` trains it,
//   - whether tensor-parallel replicas hold partial gradients (summed before the update),
//   - the Hugging Face name (import/export),
//   - how a checkpoint written under one layout is read under another (every saved piece
//     is a slice of the full tensor the table describes).
// The layers still say what they compute with (Linear registers `<name>.weight` with its
// layout); a model's ParamStore is built from the table first and a layer's registration
// only binds to the declared parameter, checking that shape and split agree.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/config.h"
#include "nn/params.h"

namespace vchat {

enum class TrainSet;

// How tensor parallelism splits a parameter (Megatron).
enum class TpSplit : uint8_t {
  none,     // every TP rank holds it whole
  rows,     // dim 0 in tp equal parts (column-parallel weights and biases, vocab rows)
  cols,     // dim 1 in tp equal parts (row-parallel weights)
  kv_rows,  // dim 0 by whole KV heads: split over tp when n_kv_heads >= tp, else rank r holds
            // head r·n_kv/tp, replicated on the tp/n_kv ranks that share it
};

// The part of the model a parameter belongs to.
enum class ModelPart : uint8_t { vision, projection, llm };

// Which `--train` settings train a parameter (bit mask).
enum TrainMask : uint8_t { kTrainDefault = 1, kTrainLora = 2, kTrainFull = 4 };

struct ParamSpec {
  std::string name;  // the vchat name (docs/MODEL.md)
  ModelPart part = ModelPart::llm;
  Shape full;        // one-rank shape
  TpSplit split = TpSplit::none;
  InitRule init = InitRule::normal;
  std::string unit;  // ZeRO-3 unit: the group of parameters used together
  // Pipeline placement: the decoder layer it belongs to; -1 = before the decoder (ViT,
  // projection, embedding: stage 0), n_layers = after it (final norm, lm_head: last stage).
  int layer = -1;
  uint8_t trained_by = 0;  // TrainMask
  // The TP replicas each see only part of the work (the image-parallel ViT, the replicated
  // half of a LoRA pair), so their gradient is summed over the TP group before the update.
  bool tp_partial_grad = false;
  std::string hf_name;  // Hugging Face name (LlamaForCausalLM / CLIPVisionModel), "" if none
  // Whether its layer's backward reads the value (not the embedding's: ids only), so ZeRO-3
  // knows what to gather for backward.
  bool backward_reads_value = true;
};

// What a TP rank does with one parameter (derived from ParamSpec::split).
struct TpPlacement {
  ShardSpec shard;  // the slice it holds
  enum GradSum : uint8_t { none, tp_group, kv_replicas } grad_sum = none;  // group its gradient is summed over
  bool owner = true;  // the one replica that counts it in norms and writes it to checkpoints
};

class ParamTable {
 public:
  ParamTable() = default;
  // The whole one-rank model for this config and training set (LoRA adapters only when
  // `train` is lora, with `lora_rank`).
  ParamTable(const ModelConfig& cfg, TrainSet train, int64_t lora_rank);

  const std::vector<ParamSpec>& all() const { return specs_; }
  const ParamSpec* find(const std::string& name) const;
  const ParamSpec& at(const std::string& name) const;  // throws naming the parameter
  const ModelConfig& config() const { return cfg_; }
  int n_layers() const { return static_cast<int>(cfg_.llm.n_layers); }

  // The slice and replication of `spec` on TP rank `tp_rank` of `tp_size`.
  TpPlacement placement(const ParamSpec& spec, int tp_rank, int tp_size) const;
  // Whether pipeline stage `stage` of `pp_size` holds `spec` (stage_layers() split).
  bool on_stage(const ParamSpec& spec, int stage, int pp_size) const;
  static bool trains(const ParamSpec& spec, TrainSet train);

 private:
  void add(ParamSpec s);
  ModelConfig cfg_;
  std::vector<ParamSpec> specs_;
  std::map<std::string, size_t> index_;
};

}  // namespace vchat
