// vchat-ckpt: checkpoint tools (docs/CHECKPOINTS.md). Thin: parse, call src/checkpoint/.
//   vchat-ckpt inspect DIR
//   vchat-ckpt verify DIR
//   vchat-ckpt consolidate DIR --out FILE.safetensors [--kind value|adam_m|adam_v] [--trainable-only]
//   vchat-ckpt status DIR      exit 0: the run finished (its last step is saved); 3: it
//                              stopped early (resume it); 1: no checkpoint / unreadable
// DIR is a checkpoint (step_XXXXXXXX) or a save directory (its `latest`). Exit 0 on success,
// 1 for a bad checkpoint (the message names the file and tensor), 2 for bad usage.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "checkpoint/inspect.h"

namespace {

int usage(const char* why) {
  if (why) std::fprintf(stderr, "vchat-ckpt: %s\n", why);
  std::fprintf(stderr,
               "usage: vchat-ckpt inspect DIR\n"
               "       vchat-ckpt verify DIR\n"
               "       vchat-ckpt consolidate DIR --out FILE.safetensors [--kind value|adam_m|adam_v] [--trainable-only]\n"
               "       vchat-ckpt status DIR   (exit 0: finished, 3: stopped early, 1: no checkpoint)\n"
               "DIR: a checkpoint directory (step_XXXXXXXX) or a save directory (its 'latest' checkpoint)\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") return usage(nullptr);
  const std::string cmd = args[0];
  if (args.size() < 2) return usage(("'" + cmd + "' needs a checkpoint directory").c_str());
  const std::string dir = args[1];
  try {
    if (cmd == "inspect" && args.size() == 2) {
      vchat::ckpt::inspect(dir, std::cout);
      return 0;
    }
    if (cmd == "verify" && args.size() == 2) {
      const std::vector<std::string> problems = vchat::ckpt::verify(dir);
      for (const std::string& p : problems) std::printf("problem: %s\n", p.c_str());
      if (!problems.empty()) {
        std::printf("verify: %s: %zu problem(s); do not resume from it\n", dir.c_str(), problems.size());
        return 1;
      }
      std::printf("verify: %s: OK (files, sizes, SHA-256, every tensor tiled exactly once)\n", dir.c_str());
      return 0;
    }
    if (cmd == "status" && args.size() == 2) {
      const vchat::ckpt::RunProgress p = vchat::ckpt::run_progress(dir);
      std::printf("status: %s: step %lld of %lld: %s\n", dir.c_str(), static_cast<long long>(p.step),
                  static_cast<long long>(p.steps), p.finished() ? "finished" : "stopped early (resume with --resume auto)");
      return p.finished() ? 0 : 3;
    }
    if (cmd == "consolidate") {
      std::string out, kind = "value";
      bool trainable_only = false;
      for (size_t i = 2; i < args.size(); ++i) {
        if (args[i] == "--out" && i + 1 < args.size()) out = args[++i];
        else if (args[i] == "--kind" && i + 1 < args.size()) kind = args[++i];
        else if (args[i] == "--trainable-only") trainable_only = true;
        else return usage(("consolidate: unknown or incomplete option '" + args[i] + "'").c_str());
      }
      if (out.empty()) return usage("consolidate needs --out FILE.safetensors");
      vchat::StateKind k;
      try {
        k = vchat::ckpt::parse_state_kind(kind, "--kind");
      } catch (const std::exception& e) {
        return usage(e.what());
      }
      const int n = vchat::ckpt::consolidate(dir, out, k, trainable_only);
      std::printf("consolidate: %d tensors (%s) written to %s\n", n, kind.c_str(), out.c_str());
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-ckpt: error: %s\n", e.what());
    return 1;
  }
  return usage(("unknown command or arguments: '" + cmd + "'").c_str());
}
