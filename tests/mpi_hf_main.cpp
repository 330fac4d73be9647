// Imported Hugging Face weights under tensor and pipeline parallelism (tests/mpi/run.sh, 2
// ranks): rank 0 builds a tiny LlamaForCausalLM (GQA) and CLIPVisionModel with transformers,
// imports them and asks transformers for the logits of a prompt; then the two ranks load the
// one-rank checkpoint as tp2 and as pp2 (each rank reading only its slices) and the logits
// equal transformers' within 1e-5 of the largest.
#include <gtest/gtest.h>

#include <cstring>

#include "hf_util.h"
#include "mpi_test_main.h"
#include "parallel/grid.h"
#include "parallel/pipeline.h"
#include "test_util.h"

namespace vchat {
namespace {

struct Fixture {
  std::string ckpt, ref;
};

// Rank 0 prepares, every rank learns the paths (one broadcast) and whether it worked.
const Fixture& fixture(Comm& world) {
  static std::unique_ptr<test::TempDir> dir;  // removed at exit
  static Fixture f;
  if (!f.ckpt.empty()) return f;
  std::vector<int32_t> msg(1024, 0);  // [ok, path bytes...]
  if (world.rank() == 0) {
    dir = std::make_unique<test::TempDir>("vchat_mpi_hf");
    const std::string llm = dir->file("llama"), clip = dir->file("clip"), ref = dir->file("logits.safetensors");
    bool ok = test::oracle_ok("make-llama " + llm + " --heads 4 --kv-heads 2 --layers 4 --theta 500000") &&
              test::oracle_ok("make-clip " + clip) &&
              test::oracle_ok("llama-logits " + llm + " --ids " + test::join(test::prompt_ids()) + " --out " + ref);
    if (ok) {
      hf::ImportOptions o;
      o.llm_dir = llm;
      o.vision_dir = clip;
      o.out_dir = dir->file("ck");
      o.quiet = true;
      hf::import_checkpoint(o);
    }
    msg[0] = ok;
    const std::string p = dir->path.string();
    for (size_t i = 0; i < p.size(); ++i) msg[1 + i] = p[i];
  }
  world.broadcast(msg.data(), static_cast<int64_t>(msg.size() * sizeof(int32_t)), 0);
  EXPECT_EQ(msg[0], 1) << "rank 0 could not prepare the Hugging Face models";
  std::string p;
  for (size_t i = 1; i < msg.size() && msg[i]; ++i) p += static_cast<char>(msg[i]);
  f.ckpt = p + "/ck";
  f.ref = p + "/logits.safetensors";
  return f;
}

// The logits of the prompt through this grid (on the last stage; empty elsewhere).
std::vector<float> logits_under(Comm& world, const GridShape& shape, const Fixture& f) {
  Grid g(world, shape);
  auto model = test::load_model(f.ckpt, ModelParallel{&g.tp(), g.coord().pp, g.shape().pp});
  const Batch b = test::text_batch(test::prompt_ids(), model->config().vision.image_size);
  MicroBatchResult r;
  run_forward_only(g.pp(), 1, [&](int mb, const Tensor& input) {
    return model->stage_forward(mb, b, input, /*backward_follows=*/false, &r, /*keep_logits=*/true);
  });
  return g.is_last_stage() ? r.logits.to_vector_f32() : std::vector<float>();
}

TEST(HfImportParallel, LogitsEqualTransformersUnderTp2AndPp2) {
  auto world = test_world();
  ASSERT_EQ(world->size(), 2);
  const Fixture& f = fixture(*world);
  const std::vector<float> want = load_safetensors(f.ref).tensors.at("logits").to_vector_f32();
  for (const GridShape& shape : {GridShape{2, 1, 1}, GridShape{1, 2, 1}}) {
    SCOPED_TRACE("tp " + std::to_string(shape.tp) + " pp " + std::to_string(shape.pp));
    const std::vector<float> got = logits_under(*world, shape, f);
    if (got.empty()) continue;  // not the last stage
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(test::max_rel(got, want), 1e-5);
  }
}

}  // namespace
}  // namespace vchat
