// vchat-train: MPI up, parse options, build the trainer, run. Exit 2 for configuration
// errors, 1 for run-time failures. Option parsing is identical on every rank, so all ranks
// stop there together; any later error may hit one rank only, so in a multi-rank job that
// rank prints and aborts the whole job (MPI_Abort) rather than leave the others waiting in
// a collective or in MPI_Finalize.
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
    std::fprintf(stderr, "vchat-train: error (rank %d): %s\n", mpi.rank(), e.what());
    if (mpi.size() > 1) vchat::MpiSession::abort_job(2);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-train: fatal (rank %d): %s\n", mpi.rank(), e.what());
    if (mpi.size() > 1) vchat::MpiSession::abort_job(1);
    return 1;
  }
  return 0;
}
