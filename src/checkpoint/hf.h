// Hugging Face checkpoints in and out (docs/CHECKPOINTS.md "Hugging Face"):
//   - HfModelDir: a model directory (config.json + one model.safetensors or the shards that
//     model.safetensors.index.json lists), every file mapped, nothing read whole;
//   - the vchat model config from HF config.json files (LlamaConfig; CLIPVisionConfig or
//     CLIPConfig's vision part): every key is used, checked for a value vchat computes the
//     same, or known not to change the forward pass; anything else is named, not ignored;
//   - import: a vchat checkpoint (step 0) from an LLM and a vision directory, tensor by tensor
//     through the parameter table's HF names, one ZeRO-3 unit in memory at a time.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/config.h"
#include "tensor.h"

namespace vchat::hf {

class HfModelDir {
 public:
  // Reads config.json and maps the safetensors files (headers validated). Throws
  // data::DataError naming the directory or file: no config.json, no safetensors (a
  // pytorch_model.bin is named with the way to convert it), an index naming a missing file
  // or a tensor its file lacks.
  explicit HfModelDir(const std::string& dir);
  ~HfModelDir();
  HfModelDir(HfModelDir&&) noexcept;

  const std::string& dir() const { return dir_; }
  const nlohmann::json& config() const { return config_; }
  std::string config_path() const { return dir_ + "/config.json"; }
  bool has(const std::string& name) const { return where_.count(name) > 0; }
  std::vector<std::string> names() const;
  // The file holding tensor `name` and its entry; throws DataError naming the directory
  // and the tensor when it has none.
  const SafetensorsMap& file_of(const std::string& name) const;
  const SafetensorsMap::Entry& entry(const std::string& name) const { return file_of(name).at(name); }
  uint64_t file_bytes() const;  // all its safetensors files together

 private:
  std::string dir_;
  nlohmann::json config_;
  std::vector<std::unique_ptr<SafetensorsMap>> files_;
  std::map<std::string, size_t> where_;  // tensor -> files_ index
};

// The vchat LLM config of a LlamaConfig (config.json's keys; absent keys take transformers'
// defaults). Throws ConfigError naming `origin` and the key for another architecture, an
// unsupported value (rope_scaling, biases, another activation, head_dim ≠ hidden/heads,
// dropout) or a key it does not know.
LlmConfig llm_config_from_hf(const nlohmann::json& cfg, const std::string& origin);
// The vision config of a CLIPVisionConfig (or the vision_config of a CLIPConfig), with the
// feature layer (index into HF hidden_states; -1 = last, as the paper) and whether the CLS
// token's row is kept.
VisionConfig vision_config_from_hf(const nlohmann::json& cfg, const std::string& origin, int64_t feature_layer,
                                   bool keep_cls);

struct ImportOptions {
  std::string llm_dir, vision_dir;  // Hugging Face model directories
  std::string out_dir;              // the checkpoint to write (must not exist)
  std::string name = "hf-import";   // the model config's name
  int64_t feature_layer = -1;
  bool keep_cls = true;
  std::string projection = "baseline";
  uint64_t seed = 1234;  // the projection's initial values: as `vchat-train --seed` draws them
  bool quiet = false;    // no progress lines
};

struct ImportReport {
  ModelConfig config;
  int64_t tensors = 0, initialised = 0;  // imported / drawn from the seed (the projection)
  int64_t bytes_read = 0;                // tensor bytes read from the safetensors files
  int64_t bytes_source = 0;              // the safetensors files' size
  int64_t bytes_written = 0;             // the checkpoint's files
  int files = 0;
  double seconds = 0;
  std::vector<std::string> unused;  // HF tensors vchat has no use for (e.g. CLIP's post_layernorm)
};

// Writes OUT_DIR as a complete vchat checkpoint of step 0 (manifest, one file per ZeRO-3
// unit, COMPLETE; written under OUT_DIR.tmp and renamed) that `vchat-train --init OUT_DIR`
// starts from in any layout. Every HF tensor vchat uses is checked against the config's
// shape; a missing tensor, a wrong shape, an integer dtype, or a tensor of a kind vchat does
// not know (another architecture) throws DataError naming the file and tensor, and nothing
// is left at OUT_DIR.
ImportReport import_checkpoint(const ImportOptions& opt);

// The HF config.json of vchat's LLM (LlamaForCausalLM, untied lm_head) and vision tower
// (CLIPVisionModel with `n_layers` = the layers vchat keeps), `torch_dtype` as written.
nlohmann::json llm_config_to_hf(const LlmConfig& c, const std::string& torch_dtype);
nlohmann::json vision_config_to_hf(const VisionConfig& v, const std::string& torch_dtype);

struct ExportOptions {
  std::string ckpt_dir;  // a checkpoint (any layout) or a save directory (its latest)
  std::string out_dir;   // must not exist
  DType dtype = DType::f32;  // f32 or bf16 (round to nearest even)
  enum class Lora { merge, adapter } lora = Lora::merge;
  bool with_vision = false;  // also write the vision tower (CLIPVisionModel)
  int64_t shard_bytes = 5'000'000'000;  // safetensors shards of at most this much (HF's default)
  bool quiet = false;
};

struct ExportReport {
  int64_t tensors = 0, bytes_written = 0;
  int llm_shards = 0;
  bool adapter = false;  // a LoRA checkpoint written as a PEFT adapter
  double seconds = 0;
};

// Writes a checkpoint as Hugging Face files under OUT_DIR (written as OUT_DIR.tmp, renamed):
//   llm/        LlamaForCausalLM: config.json, model.safetensors (or shards + index), with the
//               trained input embedding and the untied lm_head; LoRA merged (W + α/r·B·A)
//               unless `lora` is adapter:
//   llm-lora/   then a PEFT adapter (adapter_config.json, adapter_model.safetensors) over llm/
//   projection.safetensors + projection.json   the projection and what it connects
//   vision/     (with_vision) CLIPVisionModel of the layers vchat keeps
// Reads one full tensor at a time (two more for a LoRA pair).
ExportReport export_checkpoint(const ExportOptions& opt);

}  // namespace vchat::hf
