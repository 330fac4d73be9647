// vchat-train: parse options, build the trainer, run. Exit 2 for configuration errors,
// 1 for anything that fails at run time.
#include <cstdio>
#include <exception>

#include "train/train_config.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  vchat::TrainConfig cfg;
  try {
    if (!vchat::parse_train_config(argc, argv, cfg)) return 0;
  } catch (const vchat::ConfigError& e) {
    std::fprintf(stderr, "vchat-train: error: %s\n", e.what());
    return 2;
  }
  try {
    vchat::Trainer trainer(cfg);
    trainer.run();
  } catch (const vchat::ConfigError& e) {
    std::fprintf(stderr, "vchat-train: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-train: fatal: %s\n", e.what());
    return 1;
  }
  return 0;
}
