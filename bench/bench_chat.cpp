// Generation speed on the CPU (bench/run_chat_bench.sh): time to first token and tokens/s
// of greedy decoding from a checkpoint, with the KV cache (VisualChatModel::extend: each
// token runs one position) and without it (every token reruns the whole sequence), for a
// text prompt of P random ids and N new tokens (EOS not special: always N). Prints one JSON
// line; the generated ids go to --ids-out for the comparison with transformers.
//   vchat-bench-chat --ckpt DIR --prompt-len 256 --new 64 --threads 2 [--no-recompute] [--ids-out F]
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <cblas.h>
#include <nlohmann/json.hpp>

#include "checkpoint/inspect.h"
#include "checkpoint/manifest.h"
#include "checkpoint/reshard.h"
#include "model/visualchat.h"

using namespace vchat;
using clock_type = std::chrono::steady_clock;

namespace {
double since(clock_type::time_point t) { return std::chrono::duration<double>(clock_type::now() - t).count(); }

int32_t argmax(const float* x, int64_t n) { return static_cast<int32_t>(std::max_element(x, x + n) - x); }

struct Run {
  double ttft = 0, decode = 0;
  std::vector<int32_t> ids;
};

Run with_cache(const VisualChatModel& m, const std::vector<int32_t>& prompt, int n) {
  Run r;
  KvCache cache;
  const auto t0 = clock_type::now();
  Extension e{prompt, std::vector<uint8_t>(prompt.size(), ops::kText), Tensor()};
  Tensor logits = m.extend(e, cache);
  r.ids.push_back(argmax(logits.data<float>(), logits.numel()));
  r.ttft = since(t0);
  const auto t1 = clock_type::now();
  for (int k = 1; k < n; ++k) {
    logits = m.extend({{r.ids.back()}, {ops::kText}, Tensor()}, cache);
    r.ids.push_back(argmax(logits.data<float>(), logits.numel()));
  }
  r.decode = since(t1);
  return r;
}

Run recompute(VisualChatModel& m, const std::vector<int32_t>& prompt, int n) {
  Run r;
  std::vector<int32_t> seq = prompt;
  const int64_t V = m.config().llm.vocab_size;
  auto next = [&] {
    const int64_t L = static_cast<int64_t>(seq.size());
    const Batch b = Batch::from_rows(1, L, seq, std::vector<uint8_t>(L, ops::kText), std::vector<uint8_t>(L, 0), {}, 0,
                                     m.config().vision.image_size);
    const Tensor lg = m.forward_backward(b, false, 1.f, true).logits;
    return argmax(lg.data<float>() + (L - 1) * V, V);
  };
  const auto t0 = clock_type::now();
  r.ids.push_back(next());
  r.ttft = since(t0);
  const auto t1 = clock_type::now();
  for (int k = 1; k < n; ++k) {
    seq.push_back(r.ids.back());
    r.ids.push_back(next());
  }
  r.decode = since(t1);
  return r;
}
}  // namespace

int main(int argc, char** argv) {
  std::string ckpt_dir, ids_out;
  int prompt_len = 256, n = 64, threads = 2;
  bool no_recompute = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--ckpt") ckpt_dir = val();
    else if (a == "--prompt-len") prompt_len = std::stoi(val());
    else if (a == "--new") n = std::stoi(val());
    else if (a == "--threads") threads = std::stoi(val());
    else if (a == "--ids-out") ids_out = val();
    else if (a == "--no-recompute") no_recompute = true;
    else {
      std::fprintf(stderr, "usage: vchat-bench-chat --ckpt DIR [--prompt-len P] [--new N] [--threads T] [--no-recompute] [--ids-out F]\n");
      return 2;
    }
  }
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
  const std::string dir = ckpt::resolve_checkpoint(ckpt_dir, "--ckpt");
  const ckpt::Manifest m = ckpt::read_manifest(dir);
  VisualChatModel model(ModelConfig::from_json_text(m.model.dump(), dir), ckpt::model_options_of(m));
  ckpt::load_values(dir, m, model.params(), [](const Param&) { return false; });
  std::mt19937 rng(1);
  std::vector<int32_t> prompt = {1};
  while (static_cast<int>(prompt.size()) < prompt_len)
    prompt.push_back(static_cast<int32_t>(3 + rng() % (model.config().llm.vocab_size - 3)));
  with_cache(model, std::vector<int32_t>(prompt.begin(), prompt.begin() + 8), 4);  // warm-up
  const Run c = with_cache(model, prompt, n);
  nlohmann::json out = {{"prompt_len", prompt_len}, {"new", n}, {"threads", threads},
                        {"cache_ttft_s", c.ttft}, {"cache_tok_s", (n - 1) / c.decode}};
  if (!no_recompute) {
    const Run r = recompute(model, prompt, n);
    out["recompute_ttft_s"] = r.ttft;
    out["recompute_tok_s"] = (n - 1) / r.decode;
    out["recompute_equal_ids"] = r.ids == c.ids;
  }
  if (!ids_out.empty()) {
    std::ofstream f(ids_out);
    f << nlohmann::json({{"prompt", prompt}, {"ids", c.ids}}).dump();
  }
  std::printf("%s\n", out.dump().c_str());
  return 0;
}
