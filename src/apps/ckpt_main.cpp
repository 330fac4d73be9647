// vchat-ckpt: checkpoint tools (docs/CHECKPOINTS.md). Thin: parse, call src/checkpoint/.
//   vchat-ckpt inspect DIR
//   vchat-ckpt verify DIR
//   vchat-ckpt consolidate DIR --out FILE.safetensors [--kind value|adam_m|adam_v] [--trainable-only]
//   vchat-ckpt import --llm HF_DIR --vision HF_DIR --out DIR [--name N] [--feature-layer K]
//                    [--feature-select all|patch] [--seed S] [--quiet]
//   vchat-ckpt export DIR --out HF_DIR [--dtype f32|bf16] [--lora merge|adapter] [--with-vision]
//                    [--shard-size GB] [--quiet]
//   vchat-ckpt status DIR      exit 0: the run finished (its last step is saved); 3: it
//                              stopped early (resume it); 1: no checkpoint / unreadable
// DIR is a checkpoint (step_XXXXXXXX) or a save directory (its `latest`). Exit 0 on success,
// 1 for a bad checkpoint (the message names the file and tensor), 2 for bad usage.
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <sys/resource.h>

#include "checkpoint/hf.h"
#include "checkpoint/inspect.h"
#include "model/config.h"

namespace {

int usage(const char* why) {
  if (why) std::fprintf(stderr, "vchat-ckpt: %s\n", why);
  std::fprintf(stderr,
               "usage: vchat-ckpt inspect DIR\n"
               "       vchat-ckpt verify DIR\n"
               "       vchat-ckpt consolidate DIR --out FILE.safetensors [--kind value|adam_m|adam_v] [--trainable-only]\n"
               "       vchat-ckpt status DIR   (exit 0: finished, 3: stopped early, 1: no checkpoint)\n"
               "       vchat-ckpt import --llm HF_DIR --vision HF_DIR --out DIR [--name NAME] [--feature-layer K]\n"
               "                         [--feature-select all|patch] [--seed S] [--quiet]\n"
               "       vchat-ckpt export DIR --out HF_DIR [--dtype f32|bf16] [--lora merge|adapter] [--with-vision]\n"
               "                         [--shard-size GB] [--quiet]\n"
               "         HF_DIR: a Hugging Face LlamaForCausalLM / CLIPVisionModel or CLIPModel directory (safetensors)\n"
               "DIR: a checkpoint directory (step_XXXXXXXX) or a save directory (its 'latest' checkpoint)\n");
  return 2;
}

// The exit code of a failed command: 2 for a configuration mistake, 1 for bad input.
int report(const std::exception& e) {
  std::fprintf(stderr, "vchat-ckpt: error: %s\n", e.what());
  return dynamic_cast<const vchat::ConfigError*>(&e) ? 2 : 1;
}

int import_main(const std::vector<std::string>& args) {
  vchat::hf::ImportOptions opt;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool has_value = i + 1 < args.size();
    try {
      if (a == "--llm" && has_value) opt.llm_dir = args[++i];
      else if (a == "--vision" && has_value) opt.vision_dir = args[++i];
      else if (a == "--out" && has_value) opt.out_dir = args[++i];
      else if (a == "--name" && has_value) opt.name = args[++i];
      else if (a == "--feature-layer" && has_value) opt.feature_layer = std::stoll(args[++i]);
      else if (a == "--seed" && has_value) opt.seed = std::stoull(args[++i]);
      else if (a == "--quiet") opt.quiet = true;
      else if (a == "--feature-select" && has_value) {
        const std::string v = args[++i];
        if (v != "all" && v != "patch") return usage(("--feature-select " + v + ": expected all or patch").c_str());
        opt.keep_cls = v == "all";
      } else return usage(("import: unknown or incomplete option '" + a + "'").c_str());
    } catch (const std::logic_error&) {  // stoll / stoull
      return usage(("import: " + a + " " + args[i] + ": not a number").c_str());
    }
  }
  if (opt.llm_dir.empty() || opt.vision_dir.empty() || opt.out_dir.empty())
    return usage("import needs --llm HF_DIR, --vision HF_DIR and --out DIR");
  try {
    const vchat::hf::ImportReport r = vchat::hf::import_checkpoint(opt);
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    // Leftovers by part (CLIPModel's text tower is dozens of tensors): one line each.
    std::map<std::string, std::vector<std::string>> unused;
    for (const std::string& n : r.unused) unused[n.substr(0, n.find('.'))].push_back(n);
    for (const auto& [part, names] : unused) {
      if (names.size() <= 3)
        for (const std::string& n : names) std::printf("import: not used by vchat: %s\n", n.c_str());
      else
        std::printf("import: not used by vchat: %s.* (%zu tensors)\n", part.c_str(), names.size());
    }
    std::printf("import: %s: %lld tensors imported, %lld initialised from --seed (the projection); "
                "read %.1f MB of %.1f MB of safetensors in %.2f s (%.0f MB/s); wrote %d files, %.1f MB; peak memory %.1f MB\n",
                opt.out_dir.c_str(), static_cast<long long>(r.tensors), static_cast<long long>(r.initialised),
                r.bytes_read / 1e6, r.bytes_source / 1e6, r.seconds, r.bytes_read / 1e6 / std::max(r.seconds, 1e-9), r.files,
                r.bytes_written / 1e6, ru.ru_maxrss / 1e3);
    std::printf("import: model config written into the checkpoint; start training with: vchat-train --init %s\n",
                opt.out_dir.c_str());
    return 0;
  } catch (const std::exception& e) {
    return report(e);
  }
}

int export_main(const std::vector<std::string>& args) {
  vchat::hf::ExportOptions opt;
  if (args.size() < 2 || args[1].rfind("--", 0) == 0) return usage("export needs a checkpoint directory");
  opt.ckpt_dir = args[1];
  for (size_t i = 2; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--out" && has_value) opt.out_dir = args[++i];
    else if (a == "--with-vision") opt.with_vision = true;
    else if (a == "--quiet") opt.quiet = true;
    else if (a == "--dtype" && has_value) {
      const std::string v = args[++i];
      if (v != "f32" && v != "bf16") return usage(("--dtype " + v + ": expected f32 or bf16").c_str());
      opt.dtype = v == "bf16" ? vchat::DType::bf16 : vchat::DType::f32;
    } else if (a == "--lora" && has_value) {
      const std::string v = args[++i];
      if (v != "merge" && v != "adapter") return usage(("--lora " + v + ": expected merge or adapter").c_str());
      opt.lora = v == "merge" ? vchat::hf::ExportOptions::Lora::merge : vchat::hf::ExportOptions::Lora::adapter;
    } else if (a == "--shard-size" && has_value) {
      double gb = 0;
      try {
        gb = std::stod(args[++i]);
      } catch (const std::logic_error&) {
      }
      if (!(gb > 0)) return usage(("--shard-size " + args[i] + ": expected a positive size in GB").c_str());
      opt.shard_bytes = static_cast<int64_t>(gb * 1e9);
    } else return usage(("export: unknown or incomplete option '" + a + "'").c_str());
  }
  if (opt.out_dir.empty()) return usage("export needs --out HF_DIR");
  try {
    const vchat::hf::ExportReport r = vchat::hf::export_checkpoint(opt);
    std::printf("export: %s: %lld tensors, %.1f MB in %.2f s: llm/ (LlamaForCausalLM, %d file(s))%s%s, projection.safetensors + projection.json\n",
                opt.out_dir.c_str(), static_cast<long long>(r.tensors), r.bytes_written / 1e6, r.seconds, r.llm_shards,
                r.adapter ? ", llm-lora/ (PEFT adapter over llm/)" : "", opt.with_vision ? ", vision/ (CLIPVisionModel)" : "");
    return 0;
  } catch (const std::exception& e) {
    return report(e);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") return usage(nullptr);
  const std::string cmd = args[0];
  if (cmd == "import") return import_main(args);
  if (cmd == "export") return export_main(args);
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
