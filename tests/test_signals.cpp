// Stop requests (src/train/signals.h): the first SIGUSR1/SIGTERM/SIGINT only sets a flag the
// trainer polls; a second one ends the process at once with 128 + the signal. Each case runs
// in a forked child, so the test process keeps its own handlers.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "train/signals.h"

using namespace vchat;

namespace {

// Runs `body` in a child; returns its wait status.
template <class F>
int in_child(F&& body) {
  const pid_t pid = fork();
  if (pid == 0) {
    body();
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

}  // namespace

TEST(Signals, FirstSignalSetsTheFlagSecondExitsAtOnce) {
  for (int sig : {SIGUSR1, SIGTERM, SIGINT}) {
    SCOPED_TRACE(StopSignals::name(sig));
    const int status = in_child([sig] {
      StopSignals::install();
      raise(sig);  // the handler runs before raise returns
      if (StopSignals::requested() != sig) _exit(10);
      raise(sig);  // must not return
      _exit(11);
    });
    ASSERT_TRUE(WIFEXITED(status)) << "killed by a signal instead of exiting";
    EXPECT_EQ(WEXITSTATUS(status), 128 + sig) << "10: the first signal set no flag; 11: the second did not exit";
  }
}

// Before the step loop only SIGUSR1 (Slurm's warning) is caught; SIGTERM keeps its default.
TEST(Signals, OnlyTheWarningIsCaughtBeforeTheStepLoop) {
  int status = in_child([] {
    StopSignals::install_warning();
    raise(SIGUSR1);
    _exit(StopSignals::requested() == SIGUSR1 ? 0 : 10);
  });
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  status = in_child([] {
    StopSignals::install_warning();
    raise(SIGTERM);
    _exit(10);
  });
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "SIGTERM before the loop ends the process";
}
