// vchat-ckpt export against Hugging Face transformers and peft (tests/hf/hf_oracle.py):
// import -> export is bit-identical; transformers loads an exported trained checkpoint as
// LlamaForCausalLM with vchat's logits; a LoRA run exports as a PEFT adapter that peft
// loads, and as merged weights, both with vchat's logits.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "hf_util.h"
#include "test_util.h"

using namespace vchat;
namespace fs = std::filesystem;

namespace {

const test::TempDir& work() {
  static const test::TempDir dir("vchat_hf_export");
  return dir;
}

const std::string& clip_dir() {
  static const std::string d = [] {
    const std::string dir = work().file("clip");
    test::oracle_ok("make-clip " + dir + " --layers 3");
    return dir;
  }();
  return d;
}

hf::ExportReport export_to(const std::string& ckpt, const std::string& out, DType dtype = DType::f32,
                           hf::ExportOptions::Lora lora = hf::ExportOptions::Lora::merge, bool with_vision = false,
                           int64_t shard_bytes = 5'000'000'000) {
  hf::ExportOptions o;
  o.ckpt_dir = ckpt;
  o.out_dir = out;
  o.dtype = dtype;
  o.lora = lora;
  o.with_vision = with_vision;
  o.shard_bytes = shard_bytes;
  o.quiet = true;
  return hf::export_checkpoint(o);
}

// Every tensor of `original` (an HF directory) has the same dtype, shape and bytes in
// `exported`, except those listed in `skip_prefixes`.
void expect_bit_identical(const std::string& original, const std::string& exported,
                          const std::vector<std::string>& skip_prefixes = {}) {
  const hf::HfModelDir a(original), b(exported);
  int compared = 0;
  for (const std::string& n : a.names()) {
    bool skip = false;
    for (const auto& p : skip_prefixes) skip = skip || n.rfind(p, 0) == 0;
    if (skip) continue;
    ASSERT_TRUE(b.has(n)) << exported << " lacks " << n;
    const auto &ea = a.entry(n), &eb = b.entry(n);
    EXPECT_EQ(ea.dtype, eb.dtype) << n;
    EXPECT_EQ(ea.shape, eb.shape) << n;
    ASSERT_EQ(ea.end - ea.begin, eb.end - eb.begin) << n;
    EXPECT_EQ(std::memcmp(a.file_of(n).data(ea), b.file_of(n).data(eb), ea.end - ea.begin), 0) << n << " differs";
    ++compared;
  }
  EXPECT_GT(compared, 10);
}

std::string train(const std::string& init, const std::string& save, const std::string& extra) {
  int rc = 0;
  const std::string out = test::sh(std::string(VCHAT_BIN_DIR) + "/vchat-train --init " + init + " --save-dir " + save +
                                            " --steps 3 --seq-len 48 --lr 0.01 --warmup 0 --threads 1 " + extra,
                                        &rc);
  EXPECT_EQ(rc, 0) << out;
  return save;
}

}  // namespace

// F32 and BF16 sources (the second sharded): import then export in the source's dtype
// gives every LLM tensor back bit for bit, and every imported vision tensor; the config
// keys that define the model come back equal.
TEST(HfExport, ImportExportRoundTripIsBitIdentical) {
  for (const std::string dtype : {"float32", "bfloat16"}) {
    SCOPED_TRACE(dtype);
    const std::string llm = work().file("llama_rt_" + dtype);
    ASSERT_TRUE(test::oracle_ok("make-llama " + llm + " --dtype " + dtype + (dtype == "bfloat16" ? " --shards 3" : "")));
    const std::string ck = test::import_hf(llm, clip_dir(), work().file("ck_rt_" + dtype));
    const std::string out = work().file("hf_rt_" + dtype);
    const hf::ExportReport r = export_to(ck, out, dtype == "bfloat16" ? DType::bf16 : DType::f32,
                                         hf::ExportOptions::Lora::merge, /*with_vision=*/true,
                                         dtype == "bfloat16" ? 40'000 : 5'000'000'000);
    if (dtype == "bfloat16") {
      EXPECT_GT(r.llm_shards, 1) << "the shard size should have split the LLM";
    }
    expect_bit_identical(llm, out + "/llm");
    // CLIP's post_layernorm is not vchat's (exported as the identity); the rest came through
    // (the CLIP source is F32: compared in the F32 round).
    if (dtype == "float32") expect_bit_identical(clip_dir(), out + "/vision", {"vision_model.post_layernorm."});
    nlohmann::json a, b;
    std::ifstream(llm + "/config.json") >> a;
    std::ifstream(out + "/llm/config.json") >> b;
    for (const char* k : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings", "torch_dtype"})
      EXPECT_EQ(a[k], b[k]) << k;
  }
}

// Training moves the embedding copy and the projection; transformers loads the export as
// LlamaForCausalLM and its logits equal the trained vchat model's (the trained embedding,
// lm_head untied).
TEST(HfExport, TransformersLoadsTheExportWithVchatsLogits) {
  const std::string llm = work().file("llama_tr");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm + " --heads 4 --kv-heads 2"));
  const std::string ck = test::import_hf(llm, clip_dir(), work().file("ck_tr"));
  const std::string trained = train(ck, work().file("run_tr"), "");
  const std::string out = work().file("hf_tr");
  export_to(trained, out);
  // The embedding trained (so this compares a trained model, not the import).
  const hf::HfModelDir before(llm), after(out + "/llm");
  const auto& e0 = before.entry("model.embed_tokens.weight");
  EXPECT_NE(std::memcmp(before.file_of("model.embed_tokens.weight").data(e0),
                        after.file_of("model.embed_tokens.weight").data(after.entry("model.embed_tokens.weight")),
                        e0.end - e0.begin),
            0);
  const std::string ref = work().file("logits_tr.safetensors");
  ASSERT_TRUE(test::oracle_ok("llama-logits " + out + "/llm --ids " + test::join(test::prompt_ids()) + " --out " + ref));
  auto model = test::load_model(trained);
  const std::vector<float> got = test::logits_of(*model, test::prompt_ids());
  EXPECT_LT(test::max_rel(got, load_safetensors(ref).tensors.at("logits").to_vector_f32()), 1e-5);
  // The projection travels in its own file, with a json saying what it joins.
  const TensorFile proj = load_safetensors(out + "/projection.safetensors");
  EXPECT_EQ(proj.tensors.at("proj.linear.weight").shape(), Shape({32, 32}));
  nlohmann::json pj;
  std::ifstream(out + "/projection.json") >> pj;
  EXPECT_EQ(pj["tokens_per_image"], 17);
  EXPECT_EQ(pj["out_features"], 32);
}

// A LoRA run: the PEFT adapter loads with peft over the exported base and gives vchat's
// logits; the merged export (W + α/r·B·A) gives them too.
TEST(HfExport, LoraAsPeftAdapterAndMergedGiveVchatsLogits) {
  const std::string llm = work().file("llama_lora");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm + " --heads 4 --kv-heads 2"));
  const std::string ck = test::import_hf(llm, clip_dir(), work().file("ck_lora"));
  const std::string trained = train(ck, work().file("run_lora"), "--train lora --lora-rank 4 --lora-alpha 8");
  auto model = test::load_model(trained);
  ASSERT_EQ(model->options().train, TrainSet::lora);
  // Starting a run without LoRA from it would drop the adapters: refused, saying what works.
  int rc = 0;
  const std::string refused = test::sh(std::string(VCHAT_BIN_DIR) + "/vchat-train --init " + trained + " --steps 1", &rc);
  EXPECT_EQ(rc, 2) << refused;
  EXPECT_NE(refused.find("adapters would be lost"), std::string::npos) << refused;
  const std::vector<float> want = test::logits_of(*model, test::prompt_ids());
  const std::string ids = " --ids " + test::join(test::prompt_ids()) + " --out ";

  const std::string ad = work().file("hf_lora_adapter");
  const hf::ExportReport r = export_to(trained, ad, DType::f32, hf::ExportOptions::Lora::adapter);
  EXPECT_TRUE(r.adapter);
  ASSERT_TRUE(fs::exists(ad + "/llm-lora/adapter_model.safetensors"));
  const std::string ref_ad = work().file("logits_adapter.safetensors"), ref_base = work().file("logits_base.safetensors");
  ASSERT_TRUE(test::oracle_ok("llama-logits " + ad + "/llm --adapter " + ad + "/llm-lora" + ids + ref_ad));
  ASSERT_TRUE(test::oracle_ok("llama-logits " + ad + "/llm" + ids + ref_base));
  const std::vector<float> with_adapter = load_safetensors(ref_ad).tensors.at("logits").to_vector_f32();
  EXPECT_LT(test::max_rel(with_adapter, want), 1e-5);
  // Without the adapter the logits differ: the adapter is what carries the training.
  EXPECT_GT(test::max_rel(load_safetensors(ref_base).tensors.at("logits").to_vector_f32(), want), 1e-4);

  const std::string merged = work().file("hf_lora_merged");
  export_to(trained, merged, DType::f32, hf::ExportOptions::Lora::merge);
  EXPECT_FALSE(fs::exists(merged + "/llm-lora"));
  const std::string ref_m = work().file("logits_merged.safetensors");
  ASSERT_TRUE(test::oracle_ok("llama-logits " + merged + "/llm" + ids + ref_m));
  EXPECT_LT(test::max_rel(load_safetensors(ref_m).tensors.at("logits").to_vector_f32(), want), 1e-5);
}

TEST(HfExport, BadRequestsAreNamedAndNothingIsWritten) {
  const std::string llm = work().file("llama_bad");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm));
  const std::string ck = test::import_hf(llm, clip_dir(), work().file("ck_bad"));
  auto expect_error = [](const std::function<void()>& f, const std::string& needle, const std::string& out) {
    try {
      f();
      ADD_FAILURE() << "exported; expected: " << needle;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(out + ".tmp"));
  };
  const std::string out = work().file("hf_bad");
  expect_error([&] { export_to(ck, out, DType::f32, hf::ExportOptions::Lora::adapter); }, "has no LoRA adapters", out);
  EXPECT_FALSE(fs::exists(out));
  fs::create_directories(out);
  expect_error([&] { export_to(ck, out); }, "already exists", out);
  // A corrupt checkpoint file: named, and nothing at --out.
  const std::string broken = work().file("ck_broken"), out2 = work().file("hf_from_broken");
  fs::copy(ck, broken, fs::copy_options::recursive);
  const std::string unit = broken + "/unit_00004.h5";
  fs::resize_file(unit, fs::file_size(unit) / 2);
  expect_error([&] { export_to(broken, out2); }, "unit_00004.h5", out2);
  EXPECT_FALSE(fs::exists(out2));
}
