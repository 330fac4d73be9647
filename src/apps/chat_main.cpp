// vchat-chat: talk to a trained model (src/chat/). Thin: parse options, load, loop.
//   vchat-chat --ckpt DIR --tokenizer tok.model [sampling options]           interactive
//   vchat-chat --ckpt DIR --tokenizer tok.model --batch IN.jsonl --out OUT.jsonl
// In a session: "/image PATH" adds an image to the next question (up to 8 per conversation),
// any other line is a question; "clear" starts a new conversation, "quit" (or EOF) ends.
// Exit 0; 1 for a bad checkpoint or tokenizer (or a batch with failed lines); 2 for bad usage.
#include <unistd.h>

#include <omp.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "chat/batch_eval.h"
#include "chat/session.h"
#include "checkpoint/inspect.h"
#include "checkpoint/manifest.h"
#include "checkpoint/reshard.h"
#include "model/config.h"
#include "model/precision.h"

namespace po = boost::program_options;
using namespace vchat;

namespace {

// The checkpoint's weights (any layout it was written under), on `device` in `precision`.
std::unique_ptr<VisualChatModel> load(const std::string& path, Device device, Precision precision) {
  const std::string dir = ckpt::resolve_checkpoint(path, "--ckpt");
  const ckpt::Manifest m = ckpt::read_manifest(dir);
  const ModelConfig cfg = ModelConfig::from_json_text(m.model.dump(), dir + "/manifest.json");
  auto model = std::make_unique<VisualChatModel>(cfg, ckpt::model_options_of(m));
  const ckpt::InitReport r = ckpt::load_values(dir, m, model->params(), [](const Param&) { return false; });
  std::fprintf(stderr, "vchat-chat | %s: step %lld, model %s (%s, attention %s), %.1f MB read\n", dir.c_str(),
               static_cast<long long>(m.step), cfg.name.c_str(), m.train_set.c_str(), m.attention.c_str(),
               r.stats.bytes_read / 1e6);
  if (device == Device::cuda) {
    select_gpu(0);
    model->to(ExecContext::of(Device::cuda), PrecisionPolicy::of(precision));
    std::fprintf(stderr, "vchat-chat | on cuda, %s\n", precision_name(precision));
  }
  return model;
}

void interactive(chat::ChatSession& s) {
  const bool tty = isatty(STDIN_FILENO);
  std::vector<std::string> images;
  std::string line;
  while (true) {
    if (tty) std::printf("user> "), std::fflush(stdout);
    if (!std::getline(std::cin, line)) break;
    if (!tty) std::printf("user> %s\n", line.c_str());  // a transcript when fed from a file
    if (line == "quit" || line == "exit") break;
    if (line == "clear") {
      s.clear();
      images.clear();
      std::printf("(new conversation)\n");
      continue;
    }
    if (line.rfind("/image ", 0) == 0) {
      images.push_back(line.substr(7));
      continue;
    }
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    try {
      std::printf("assistant> ");
      std::fflush(stdout);
      const chat::Answer a = s.ask(line, images, [](const std::string& piece) {
        std::fputs(piece.c_str(), stdout);
        std::fflush(stdout);
      });
      std::printf("\n");
      std::fflush(stdout);
      std::fprintf(stderr, "(%zu tokens, first after %.2f s, %.1f tokens/s%s)\n", a.ids.size(), a.first_token_seconds,
                   a.ids.size() / std::max(a.seconds - a.first_token_seconds, 1e-9),
                   a.stopped_at_eos ? "" : ", stopped at --max-new-tokens");
    } catch (const chat::ChatError& e) {
      std::printf("\n");
      std::fflush(stdout);
      std::fprintf(stderr, "vchat-chat: %s\n", e.what());
    }
    images.clear();
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string ckpt_dir, tokenizer, batch, out, image_root, image_mode = "pad", device = "auto", precision = "auto";
  Device dev = Device::cpu;
  Precision prec = Precision::fp32;
  chat::ChatOptions opt;
  int threads = 0;
  po::options_description o("vchat-chat options");
  // clang-format off
  o.add_options()
    ("help,h", "this help")
    ("ckpt", po::value(&ckpt_dir), "checkpoint (any layout) or save directory (its latest)")
    ("tokenizer", po::value(&tokenizer), "the sentencepiece model the data was prepared with (LLaMA-2's tokenizer.model)")
    ("temperature", po::value(&opt.sampling.temperature)->default_value(0.f), "0: greedy; else sample at this temperature")
    ("top-k", po::value(&opt.sampling.top_k)->default_value(0), "sample from the k most likely tokens (0: all)")
    ("top-p", po::value(&opt.sampling.top_p)->default_value(1.f), "sample from the smallest set reaching this probability")
    ("repetition-penalty", po::value(&opt.sampling.repetition_penalty)->default_value(1.f), "> 1 discourages repeating the conversation's tokens")
    ("seed", po::value(&opt.sampling.seed)->default_value(0), "sampling seed")
    ("max-new-tokens", po::value(&opt.sampling.max_new_tokens)->default_value(256), "longest answer")
    ("image-mode", po::value(&image_mode)->default_value("pad"), "pad or crop, as the data was prepared (vchat-prep --image-mode)")
    ("batch", po::value(&batch), "evaluate the conversations of this jsonl file instead of chatting")
    ("out", po::value(&out), "with --batch: the generated answers (jsonl)")
    ("image-root", po::value(&image_root), "with --batch: where relative image paths start (default: the input's directory)")
    ("device", po::value(&device)->default_value("auto"), "cpu, cuda, or auto (cuda when this build has CUDA and a GPU is visible)")
    ("precision", po::value(&precision)->default_value("auto"), "on cuda: bf16 or fp32 (auto: bf16 on cuda, fp32 on cpu)")
    ("threads", po::value(&threads)->default_value(0), "CPU threads (0: OpenMP's default)");
  // clang-format on
  try {
    po::variables_map vm;
    po::store(po::parse_command_line(argc, argv, o), vm);
    po::notify(vm);
    if (vm.count("help")) {
      std::cout << "usage: vchat-chat --ckpt DIR --tokenizer tok.model [--batch IN.jsonl --out OUT.jsonl] [options]\n\n" << o;
      return 0;
    }
    if (ckpt_dir.empty() || tokenizer.empty()) throw std::invalid_argument("needs --ckpt DIR and --tokenizer FILE (see --help)");
    if (!batch.empty() && out.empty()) throw std::invalid_argument("--batch needs --out OUT.jsonl");
    opt.image_mode = prep::parse_image_mode(image_mode);
    chat::validate(opt.sampling);
    dev = resolve_device(device, built_with_cuda(), device == "cpu" ? 0 : visible_gpus());
    prec = resolve_precision(precision, dev);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-chat: %s\n", e.what());
    return 2;
  }
  if (threads > 0) omp_set_num_threads(threads);
  try {
    const auto model = load(ckpt_dir, dev, prec);
    const prep::Tokenizer tok = prep::Tokenizer::load(tokenizer);
    chat::ChatSession session(*model, tok, opt);
    if (batch.empty()) {
      interactive(session);
      return 0;
    }
    const chat::BatchReport r = chat::run_batch(session, batch, out, image_root, std::cerr);
    std::printf("batch: %d lines (%d failed) -> %s", r.lines, r.failed, out.c_str());
    if (r.scored) std::printf(" | exact match %d/%d (%.1f%%), token F1 %.3f", r.exact, r.scored, 100 * r.exact_rate(), r.mean_f1());
    std::printf("\n");
    return r.failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-chat: error: %s\n", e.what());
    return 1;
  }
}
