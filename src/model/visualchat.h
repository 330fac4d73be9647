// The whole VisualChat model: ViT → projection → image rows spliced into the token
// embeddings → LLaMA-2 blocks with MMCA → final norm → lm_head → masked cross-entropy.
// forward_backward() is one micro-batch, readable top to bottom (llm.c style).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/batch.h"
#include "model/config.h"
#include "model/kv_cache.h"
#include "model/llama.h"
#include "model/param_table.h"
#include "model/precision.h"
#include "model/projection.h"
#include "nn/units.h"
#include "model/vit.h"

namespace vchat {

// A host f32 copy of t (t itself when it is one already): results for the caller.
// A host f32 copy of t (t itself when it is one): a bf16 device tensor is cast on the device.
Tensor host_f32(const ExecContext& ex, const Tensor& t);

// What trains (DESIGN.md §3.4, docs/MODEL.md).
enum class TrainSet { paper_default, lora, full };
TrainSet parse_train_set(const std::string& s);  // "default" | "lora" | "full"; throws ConfigError
const char* train_set_name(TrainSet t);
ops::AttnMode parse_attention(const std::string& s);  // "mmca" | "causal"; throws ConfigError

struct ModelOptions {
  ops::AttnMode attention = ops::AttnMode::mmca;
  TrainSet train = TrainSet::paper_default;
  int64_t lora_rank = 8;
  float lora_alpha = 16.f;
  Recompute recompute = Recompute::none;  // decoder blocks' activations (--recompute)
};

// A new stretch of one conversation for generation (VisualChatModel::extend): token ids
// (ignored at image positions), each position's modality (text or image), and the pixels
// [n_images, 3, S, S] (CLIP-normalised) of its images, tokens_per_image positions each, in order.
struct Extension {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> modality;
  Tensor pixels;
};

struct MicroBatchResult {
  double loss = 0.0;         // mean CE over the micro-batch's supervised tokens
  double loss_sum = 0.0;     // summed CE over them (both 0 when the loss went to a loss_acc)
  int64_t supervised = 0;    // tokens that carried loss
  Tensor logits;             // [B*L, V], only when asked for
};

// Where this rank sits in the model-parallel part of the grid (DESIGN.md §5).
struct ModelParallel {
  Comm* tp = nullptr;  // tensor-parallel group; nullptr: one rank
  int pp_rank = 0, pp_size = 1;
};

class VisualChatModel {
 public:
  // Builds this rank's part: its pipeline stage's layers (stage 0 also the ViT, projection
  // and embedding; the last stage the final norm and lm_head), each split over the
  // tensor-parallel group. Parameter names are the one-rank names (global layer indices);
  // Param::shard says which slice a rank holds. Collective over mp.tp (one split).
  VisualChatModel(const ModelConfig& cfg, const ModelOptions& opt, const ModelParallel& mp = {});

  // Forward, loss and (when backward) the gradient of grad_scale · loss_sum / loss_tokens
  // accumulated into the trainable parameters' grads. loss_tokens = 0 means this
  // micro-batch's own supervised count (its mean loss); the trainer passes the supervised
  // count of the whole global batch, so the step loss is the token mean over the global
  // batch whatever the micro-batch and DP split (docs/DECISIONS.md).
  // Needs the whole model on this rank's stage (pp_size 1).
  MicroBatchResult forward_backward(const Batch& batch, bool backward, float grad_scale = 1.f,
                                    bool keep_logits = false, int64_t loss_tokens = 0);

  // The pipeline's pieces (src/parallel/pipeline.h drives them), one micro-batch each; a
  // micro-batch's activations live from its forward to its backward, so several can be in
  // flight. `input`: the previous stage's hidden state [B*L, H] (undefined on the first
  // stage). Returns the hidden state for the next stage; the last stage returns undefined and
  // fills *result (loss; logits over the whole vocabulary when keep_logits). With loss_acc
  // (f32 [1] on the model's device) the summed loss is added there instead of being copied
  // to the host: the trainer's step reads its loss back once, after the update.
  Tensor stage_forward(int mb, const Batch& batch, const Tensor& input, bool backward_follows,
                       MicroBatchResult* result = nullptr, bool keep_logits = false, const Tensor& loss_acc = Tensor());
  // `doutput`: the gradient of this stage's output (undefined on the last stage, which starts
  // from the loss: its gradient is loss_scale · d(loss_sum)). Returns the gradient of the
  // stage's input (undefined on the first stage).
  Tensor stage_backward(int mb, const Batch& batch, const Tensor& doutput, float loss_scale);
  // The vision encoder's selected hidden state for `pixels` [N, 3, S, S] (normalised as
  // CLIP expects): [N * tokens_per_image, W], forward only. First stage, whole on this rank
  // (no image parallelism): what the import test compares with transformers.
  Tensor image_features(const Tensor& pixels) const;
  // Generation (vchat-chat; DESIGN.md §10): appends `e` to the conversation `cache` holds,
  // runs only its positions (keys and values of the earlier ones come from the cache), and
  // returns the logits of its last position [V] (host f32). The same function as a forward
  // over the whole sequence. Whole model on this rank (tp 1, pp 1), on its device (the cache
  // follows it: KvCache::reserve with the model's device and compute dtype). Throws
  // std::invalid_argument naming the problem (empty, image positions that disagree with the
  // pixels, past llm.max_seq_len).
  Tensor extend(const Extension& e, KvCache& cache) const;
  bool first_stage() const { return mp_.pp_rank == 0; }
  // The sub-group of TP ranks sharing a replicated KV head (nullptr when KV heads are split),
  // for traffic accounting.
  Comm* kv_replicas() const { return kv_replicas_.get(); }
  bool last_stage() const { return mp_.pp_rank == mp_.pp_size - 1; }

  // This rank's parameter units in order of use (ZeRO-3 gathers them), and the hooks to
  // call around each use (nullptr: weights stay resident).
  std::vector<ParamUnit> units() const;
  void set_hooks(UnitHooks* hooks) { hooks_ = hooks; }

  // Who puts the weights on the device: to() (ParamStore::to) all of them; to() all but the
  // trainable fp32 masters under working copies, which ZeRO-1 shards from the host; or the
  // optimizer every one (ZeRO-2/3 shard the weights from the host).
  enum class Placement : uint8_t { moved, trainable_masters_on_host, by_optimizer };
  // Moves this rank's parameters to ex's device with the policy's working copies (before the
  // optimizer flattens them), as `placement` says; activations then live there in the
  // compute dtype and every op runs with `ex`. A model starts on the CPU's context.
  void to(const ExecContext& ex, const PrecisionPolicy& policy, Placement placement = Placement::moved);
  Device device() const { return device_; }
  const ExecContext& exec() const { return ex_; }
  DType compute_dtype() const { return compute_; }

  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  const ParamTable& table() const { return table_; }  // the whole one-rank model's parameters
  const ModelConfig& config() const { return cfg_; }
  const ModelOptions& options() const { return opt_; }
  // Recomputes which parts need a backward after trainable flags change (tests flip them).
  void refresh_trainable();
  ~VisualChatModel();

 private:
  struct Cache;
  int tp_size() const { return tp_.size(); }
  // Unit indices (the order of use): [ViT units, projection, embedding] on the first stage,
  // then this stage's blocks, then the head on the last.
  int unit_proj() const { return vit_.n_units(); }
  int unit_embed() const { return vit_.n_units() + 1; }
  int unit_block(size_t i) const { return (first_stage() ? vit_.n_units() + 2 : 0) + static_cast<int>(i); }
  int unit_head() const { return unit_block(blocks_.size()); }
  HookCursor hook(int unit) const { return {hooks_, unit}; }
  // The image-parallel slice [begin, end) of a micro-batch's images this TP rank encodes.
  std::pair<int64_t, int64_t> my_images(int64_t n_images) const;

  ModelConfig cfg_;
  ModelOptions opt_;
  ModelParallel mp_;
  ParamTable table_;  // before params_: every Param points at its entry
  ParamStore params_;
  std::unique_ptr<Comm> kv_replicas_;  // see TensorParallel
  TensorParallel tp_;
  int64_t vocab_begin_ = 0, vocab_size_ = 0;  // this rank's vocabulary rows
  VisionEncoder vit_;
  Projection proj_;
  Param* embed_ = nullptr;
  std::vector<LlamaBlock> blocks_;  // this stage's layers
  int first_layer_ = 0;
  RMSNorm final_norm_;
  Linear lm_head_;
  bool vit_trains_ = false, image_path_trains_ = false;
  UnitHooks* hooks_ = nullptr;
  ExecContext ex_;  // how every op of this model runs (to())
  Device device_ = Device::cpu;
  DType compute_ = DType::f32;
  std::map<int, std::unique_ptr<Cache>> caches_;  // per micro-batch in flight
};

}  // namespace vchat
