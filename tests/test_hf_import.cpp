// vchat-ckpt import against Hugging Face transformers (tests/hf/hf_oracle.py): tiny random
// LlamaForCausalLM / CLIPVisionModel / CLIPModel checkpoints saved as users' are, imported,
// loaded, and compared with transformers' own forward; malformed inputs named, nothing left.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/sample.h"
#include "hf_util.h"
#include "test_util.h"

using namespace vchat;
namespace fs = std::filesystem;

namespace {

const test::TempDir& work() {
  static const test::TempDir dir("vchat_hf");
  return dir;
}

// One CLIPVisionModel for the LLM tests (the import needs a vision tower).
const std::string& clip_dir() {
  static const std::string d = [] {
    const std::string dir = work().file("clip");
    test::oracle_ok("make-clip " + dir);
    return dir;
  }();
  return d;
}

std::string import(const std::string& llm, const std::string& vision, const std::string& out, int64_t feature_layer = -1,
                   bool keep_cls = true) {
  return test::import_hf(llm, vision, out, feature_layer, keep_cls);
}

struct LlamaCase {
  std::string tag, args;
};

}  // namespace

// GQA and plain MHA, two rope thetas, F32 / BF16 / F16 files, one file or shards, a tied
// lm_head: vchat's logits equal transformers' within 1e-5 of the largest.
TEST(HfImport, LlamaLogitsEqualTransformers) {
  const std::vector<LlamaCase> cases = {
      {"gqa_f32", "--heads 4 --kv-heads 2 --theta 10000"},
      {"mha_bf16_shards", "--heads 4 --kv-heads 4 --theta 500000 --dtype bfloat16 --shards 3"},
      {"mqa_f16_tied", "--heads 4 --kv-heads 1 --theta 1000000 --dtype float16 --tie --layers 3"},
  };
  for (const LlamaCase& c : cases) {
    SCOPED_TRACE(c.tag);
    const std::string llm = work().file("llama_" + c.tag), ref = work().file("logits_" + c.tag + ".safetensors");
    ASSERT_TRUE(test::oracle_ok("make-llama " + llm + " " + c.args));
    ASSERT_TRUE(test::oracle_ok("llama-logits " + llm + " --ids " + test::join(test::prompt_ids()) + " --out " + ref));
    const std::string ck = import(llm, clip_dir(), work().file("ck_" + c.tag));
    auto model = test::load_model(ck);
    const std::vector<float> got = test::logits_of(*model, test::prompt_ids());
    const std::vector<float> want = load_safetensors(ref).tensors.at("logits").to_vector_f32();
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(test::max_rel(got, want), 1e-5);
  }
}

// The selected hidden state (feature layer) of a CLIPVisionModel and of a CLIPModel's vision
// half, with and without the CLS row, equals transformers' hidden_states[k].
TEST(HfImport, ClipSelectedHiddenStateEqualsTransformers) {
  struct Case {
    std::string tag, make, layer;
    bool keep_cls;
  };
  const std::vector<Case> cases = {{"vision_last", "", "-1", true},
                                   {"full_gelu_penultimate", "--full --act gelu --layers 3", "-2", true},
                                   {"vision_patch_layer1", "--layers 3", "1", false}};
  const std::string llm = work().file("llama_for_clip");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm));
  for (const Case& c : cases) {
    SCOPED_TRACE(c.tag);
    const std::string vis = work().file("clip_" + c.tag), ref = work().file("hidden_" + c.tag + ".safetensors");
    ASSERT_TRUE(test::oracle_ok("make-clip " + vis + " " + c.make));
    ASSERT_TRUE(test::oracle_ok("clip-hidden " + vis + " --layer " + c.layer + " --images 2 --out " + ref));
    const std::string ck = import(llm, vis, work().file("ck_" + c.tag), std::stoll(c.layer), c.keep_cls);
    auto model = test::load_model(ck);
    const TensorFile r = load_safetensors(ref);
    const Tensor& hidden = r.tensors.at("hidden");  // [N, T, W], T with the CLS row
    const std::vector<float> got =
        host_f32(model->exec(), model->image_features(r.tensors.at("pixels"))).to_vector_f32();
    std::vector<float> want;
    const int64_t N = hidden.size(0), T = hidden.size(1), W = hidden.size(2);
    const std::vector<float> h = hidden.to_vector_f32();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t t = c.keep_cls ? 0 : 1; t < T; ++t)
        want.insert(want.end(), h.begin() + (n * T + t) * W, h.begin() + (n * T + t + 1) * W);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(test::max_rel(got, want), 1e-5);
  }
}

// The import is a complete step-0 checkpoint: verify passes, vchat-train --init starts from
// it (its model config), and --init refuses another model or an explicit --resume.
TEST(HfImport, ImportedCheckpointVerifiesAndTrainingStartsFromIt) {
  const std::string llm = work().file("llama_train");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm));
  const std::string ck = import(llm, clip_dir(), work().file("ck_train"));
  const std::string bin = std::string(VCHAT_BIN_DIR);
  int rc = 0;
  std::string out = test::sh(bin + "/vchat-ckpt verify " + ck, &rc);
  EXPECT_EQ(rc, 0) << out;
  out = test::sh(bin + "/vchat-train --init " + ck + " --steps 2 --seq-len 48 --threads 1", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("initialised from " + ck), std::string::npos) << out;
  EXPECT_NE(out.find("model hf-import"), std::string::npos) << out;
  out = test::sh(bin + "/vchat-train --init " + ck + " --model " + VCHAT_SOURCE_DIR + "/inputs/models/tiny.json --steps 1", &rc);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("written for another model"), std::string::npos) << out;
  out = test::sh(bin + "/vchat-train --init " + ck + " --resume " + ck + " --steps 1", &rc);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("exclude each other"), std::string::npos) << out;
  // A requeued job keeps its command line: with checkpoints in --save-dir it resumes from
  // them, and the --init checkpoint is not even read (here: gone).
  const std::string gone = work().file("ck_train_gone"), save = work().file("run_requeued");
  fs::copy(ck, gone, fs::copy_options::recursive);
  const std::string cmd = bin + "/vchat-train --init " + gone + " --resume auto --save-dir " + save + " --seq-len 48 --threads 1";
  out = test::sh(cmd + " --steps 2", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("initialised from " + gone), std::string::npos) << out;
  fs::remove_all(gone);
  out = test::sh(cmd + " --steps 3", &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
}

// openai's CLIP configs (written by older transformers) carry every PretrainedConfig key in
// vision_config, tie_word_embeddings among them, and a vision_config_dict that overrides it.
TEST(HfImport, OpenAiStyleClipConfigImports) {
  const std::string llm = work().file("llama_openai"), vis = work().file("clip_openai");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm));
  ASSERT_TRUE(test::oracle_ok("make-clip " + vis + " --full"));
  nlohmann::json j;
  std::ifstream(vis + "/config.json") >> j;
  j["vision_config"]["tie_word_embeddings"] = true;
  j["vision_config"]["return_dict"] = true;
  j["vision_config"]["hidden_act"] = "gelu";  // overridden below: the dict wins, as in transformers
  j["vision_config_dict"] = {{"hidden_act", "quick_gelu"}, {"tie_word_embeddings", true}};
  std::ofstream(vis + "/config.json") << j.dump(1);
  const std::string ck = import(llm, vis, work().file("ck_openai"));
  EXPECT_EQ(ckpt::read_manifest(ck).model["vision"]["act"], "quick_gelu");
}

namespace {

// A copy of an HF directory to break.
std::string copy_dir(const std::string& from, const std::string& tag) {
  const std::string to = work().file("bad_" + tag);
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
  return to;
}

void edit_config(const std::string& dir, const std::function<void(nlohmann::json&)>& f) {
  nlohmann::json j;
  {
    std::ifstream in(dir + "/config.json");
    in >> j;
  }
  f(j);
  std::ofstream(dir + "/config.json") << j.dump(1);
}

void edit_tensors(const std::string& file, const std::function<void(TensorFile&)>& f) {
  TensorFile t = load_safetensors(file);
  f(t);
  save_safetensors(file, t);
}

// Import must fail with a message holding every needle, and leave nothing at --out.
void expect_import_error(const std::string& llm, const std::string& vision, const std::vector<std::string>& needles) {
  const std::string out = work().file("ck_must_not_exist");
  try {
    import(llm, vision, out);
    ADD_FAILURE() << "imported a bad checkpoint; expected: " << needles[0];
  } catch (const std::exception& e) {
    for (const std::string& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out + ".tmp")) << "a failed import must not leave its temporary directory";
}

}  // namespace

TEST(HfImport, BadCheckpointsAreNamedAndNothingIsWritten) {
  const std::string good = work().file("llama_good"), sharded = work().file("llama_good_sharded");
  ASSERT_TRUE(test::oracle_ok("make-llama " + good));
  ASSERT_TRUE(test::oracle_ok("make-llama " + sharded + " --shards 3"));
  const std::string st = "/model.safetensors";
  {
    SCOPED_TRACE("truncated shard");
    const std::string d = copy_dir(sharded, "truncated");
    const std::string shard = d + "/model-00002-of-00004.safetensors";
    fs::resize_file(shard, fs::file_size(shard) - 64);
    expect_import_error(d, clip_dir(), {shard, "truncated"});
  }
  {
    SCOPED_TRACE("corrupt header");
    const std::string d = copy_dir(good, "corrupt");
    std::fstream f(d + st, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(12);
    f.write("\x01\x02garbage", 9);
    f.close();
    expect_import_error(d, clip_dir(), {d + st, "corrupt safetensors header"});
  }
  {
    SCOPED_TRACE("missing tensor");
    const std::string d = copy_dir(good, "missing");
    edit_tensors(d + st, [](TensorFile& t) { t.tensors.erase("model.layers.1.mlp.up_proj.weight"); });
    expect_import_error(d, clip_dir(), {"model.layers.1.mlp.up_proj.weight", d});
  }
  {
    SCOPED_TRACE("index names a missing shard");
    const std::string d = copy_dir(sharded, "missing_shard");
    fs::remove(d + "/model-00003-of-00004.safetensors");
    expect_import_error(d, clip_dir(), {"model-00003-of-00004.safetensors", "missing"});
  }
  {
    SCOPED_TRACE("shape that does not match the config");
    const std::string d = copy_dir(good, "shape");
    edit_config(d, [](nlohmann::json& j) { j["intermediate_size"] = 48; });
    expect_import_error(d, clip_dir(), {"mlp.", "[48, 32]", d + st});
  }
  {
    SCOPED_TRACE("integer tensor");
    const std::string d = copy_dir(good, "int");
    edit_tensors(d + st, [](TensorFile& t) {
      t.tensors["model.norm.weight"] = Tensor::from_vector(std::vector<int32_t>(32, 1), {32});
    });
    expect_import_error(d, clip_dir(), {"model.norm.weight", "I32"});
  }
  {
    SCOPED_TRACE("a tensor of another architecture");
    const std::string d = copy_dir(good, "extra");
    edit_tensors(d + st, [](TensorFile& t) { t.tensors["model.layers.0.self_attn.q_norm.weight"] = Tensor::zeros({8}); });
    expect_import_error(d, clip_dir(), {"model.layers.0.self_attn.q_norm.weight", "no place"});
  }
  {
    SCOPED_TRACE("unsupported architecture");
    const std::string d = copy_dir(good, "arch");
    edit_config(d, [](nlohmann::json& j) { j["model_type"] = "mistral"; j["architectures"] = {"MistralForCausalLM"}; });
    expect_import_error(d, clip_dir(), {d + "/config.json", "mistral"});
    edit_config(d, [](nlohmann::json& j) { j["model_type"] = "llama"; j["architectures"] = {"LlamaForSequenceClassification"}; });
    expect_import_error(d, clip_dir(), {"unsupported architecture", "LlamaForSequenceClassification"});
    expect_import_error(good, good, {"clip_vision_model"});  // an LLM given as the vision tower
  }
  {
    SCOPED_TRACE("unsupported or unknown config values");
    const std::string d = copy_dir(good, "keys");
    edit_config(d, [](nlohmann::json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}}; });
    expect_import_error(d, clip_dir(), {"rope_scaling", "not implemented"});
    edit_config(d, [](nlohmann::json& j) { j["rope_scaling"] = nullptr; j["sliding_window"] = 4096; });
    expect_import_error(d, clip_dir(), {"\"sliding_window\"", "unknown config key"});
    edit_config(d, [](nlohmann::json& j) { j.erase("sliding_window"); j["hidden_act"] = "gelu"; });
    expect_import_error(d, clip_dir(), {"hidden_act", "silu"});
  }
  {
    SCOPED_TRACE("PyTorch pickles only");
    const std::string d = copy_dir(good, "pickle");
    fs::remove(d + st);
    std::ofstream(d + "/pytorch_model.bin") << "not read";
    expect_import_error(d, clip_dir(), {"pytorch_model.bin", "safe_serialization"});
  }
  {
    SCOPED_TRACE("existing output");
    const std::string out = work().file("ck_exists");
    fs::create_directories(out);
    try {
      import(good, clip_dir(), out);
      ADD_FAILURE() << "wrote into an existing directory";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("already exists"), std::string::npos) << e.what();
    }
  }
}
