// vchat-train: MPI up, parse options, build the trainer, run. Exit 2 for configuration
// errors (every rank parses the same options, so all ranks stop together), 1 for run-time
// failures (the failing rank aborts the job so no rank waits forever in a collective).
#include <cstdio>
#include <exception>

#include "parallel/comm.h"
#include "train/train_config.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  vchat::MpiSession mpi(&argc, &argv);
  const bool root = mpi.rank() == 0;
  vchat::TrainConfig cfg;
  try {
    if (!vchat::parse_train_config(argc, argv, cfg)) return 0;
  } catch (const vchat::ConfigError& e) {
    if (root) std::fprintf(stderr, "vchat-train: error: %s\n", e.what());
    return 2;
  }
  try {
    auto world = mpi.world();
    vchat::Trainer trainer(cfg, world.get());
    trainer.run();
  } catch (const vchat::ConfigError& e) {
    if (root) std::fprintf(stderr, "vchat-train: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-train: fatal (rank %d): %s\n", mpi.rank(), e.what());
    if (mpi.size() > 1) vchat::MpiSession::abort_job(1);
    return 1;
  }
  return 0;
}
