// Stop requests from outside (DESIGN.md §7): Slurm's warning before the time limit
// (`#SBATCH --signal=USR1@N`), a preemption's SIGTERM, or Ctrl-C. The first SIGUSR1, SIGTERM
// or SIGINT only sets a flag: the trainer agrees on it with every rank after the current
// step, saves and exits 0. A second one exits the process at once (status 128 + signal).
#pragma once

namespace vchat {

class StopSignals {
 public:
  // SIGUSR1 only, at program start: Slurm's warning can come at any moment, also while the
  // run starts up; a request then stops the run after its first step.
  static void install_warning();
  // All three (idempotent). The trainer calls it when its step loop starts: before that,
  // SIGTERM and SIGINT keep their default action (mpirun's SIGTERM to the peers of a rank
  // that failed at start-up must end them).
  static void install();
  // The first signal received (SIGUSR1, SIGTERM or SIGINT), or 0.
  static int requested();
  static const char* name(int sig);  // "SIGUSR1", ...
  static void reset();               // tests: forget a request
};

}  // namespace vchat
