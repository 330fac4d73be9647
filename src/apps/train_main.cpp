// vchat-train: MPI up, parse options, build the trainer, run. Exit 2 for configuration
// errors, 1 for run-time failures. Option parsing is identical on every rank, so all ranks
// stop there together; any later error may hit one rank only, so in a multi-rank job that
// rank prints and aborts the whole job (MPI_Abort) rather than leave the others waiting in
// a collective or in MPI_Finalize.
#include <csignal>
#include <cstdio>
#include <exception>
#include <memory>
#include <string>

#include "exec.h"
#include "model/precision.h"
#include "parallel/comm.h"
#include "parallel/device_sharing.h"
#include "model/grid_rules.h"
#include "parallel/grid.h"
#ifdef VCHAT_WITH_CUDA
#include "parallel/comm_nccl.h"
#endif
#include "train/signals.h"
#include "train/train_config.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) then fails a write with EFBIG, which names the file,
  // instead of killing the process in the middle of a checkpoint.
  std::signal(SIGXFSZ, SIG_IGN);
  vchat::StopSignals::install_warning();  // Slurm's --signal=USR1@N may come during start-up
  vchat::MpiSession mpi(&argc, &argv);
  const bool root = mpi.rank() == 0;
  vchat::TrainConfig cfg;
  try {
    if (!vchat::parse_train_config(argc, argv, cfg)) return 0;
  } catch (const vchat::ConfigError& e) {
    if (root) std::fprintf(stderr, "vchat-train: error: %s\n", e.what());
    return 2;
  }
  // The grid: checked identically by every rank before any work, so on a bad grid all
  // ranks stop together and only rank 0 speaks.
  auto world = mpi.world();
  world->set_timeout(cfg.comm_timeout);
  // On GPUs: NCCL (one GPU per rank), or MPI, which stages device buffers through the host
  // (any layout, also several ranks on one GPU). The grid's groups inherit the backend.
  std::unique_ptr<vchat::Comm> device_world;
  try {
    if (cfg.device == vchat::Device::cuda) {
      vchat::select_gpu(mpi.rank());
      // NCCL only where no two ranks drive one GPU (NCCL refuses that), found by all ranks
      // together so that all of them take the same path.
      const std::string shared = vchat::shared_device(*world, vchat::gpu_identity());
      if (cfg.comm == "nccl" && !shared.empty())
        throw vchat::ConfigError("--comm nccl: " + shared +
                                 ", and NCCL needs a GPU per rank: run one rank per GPU, or use --comm mpi "
                                 "(device buffers staged through the host) or --comm auto");
      const bool nccl = cfg.comm == "nccl" || (cfg.comm == "auto" && shared.empty());
      if (nccl) {
#ifdef VCHAT_WITH_CUDA
        // Ordered against the device's compute stream, the one the trainer's ops run on.
        const vchat::ExecContext gpu = vchat::ExecContext::of(vchat::Device::cuda);
        device_world = vchat::cuda::make_nccl_comm(*world, "world", gpu.cuda("vchat-train"));
#endif
      }
      const std::string path =
          device_world ? "NCCL"
                       : "MPI (device buffers staged through the host" + (shared.empty() ? "" : ": " + shared) + ")";
      if (root)
        std::printf("vchat-train | device %s, %s, collectives over %s\n", vchat::gpu_description().c_str(),
                    vchat::precision_name(cfg.precision), path.c_str());
    }
  } catch (const vchat::ConfigError& e) {
    if (root) std::fprintf(stderr, "vchat-train: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {  // a GPU or NCCL that fails to start: every rank may not see it
    std::fprintf(stderr, "vchat-train: fatal (rank %d): setting up the GPU: %s\n", mpi.rank(), e.what());
    if (mpi.size() > 1) vchat::MpiSession::abort_job(1);
    return 1;
  }
  vchat::Comm& comm_world = device_world ? *device_world : *world;
  std::unique_ptr<vchat::Grid> grid;
  try {
    const vchat::GridShape shape = vchat::infer_grid(comm_world.size(), cfg.tp, cfg.pp);
    // --global-batch, when given, sets the micro-batches per step and replica (for the
    // synthetic and the data path alike), so the pipeline check sees the real M.
    if (cfg.global_batch > 0) {
      const int64_t per_micro = cfg.data.batch_size * shape.dp;
      if (cfg.global_batch % per_micro != 0)
        throw vchat::ConfigError("--global-batch=" + std::to_string(cfg.global_batch) +
                                 " is not a multiple of --micro-batch-size=" + std::to_string(cfg.data.batch_size) +
                                 " x dp=" + std::to_string(shape.dp));
      cfg.micro_batches = cfg.global_batch / per_micro;
    }
    vchat::validate_grid(shape, cfg.model, static_cast<int>(cfg.micro_batches));
    grid = std::make_unique<vchat::Grid>(comm_world, shape);
  } catch (const vchat::ConfigError& e) {
    if (root) std::fprintf(stderr, "vchat-train: error: %s\n", e.what());
    return 2;
  }
  if (root) std::printf("vchat-train | %s\n", grid->describe().c_str());
  try {
    vchat::Trainer trainer(cfg, grid.get());
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
