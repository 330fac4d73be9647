#include "train/signals.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <initializer_list>

namespace vchat {

namespace {

std::atomic<int> g_signal{0};

// Async-signal-safe: an atomic store, write(2) and _exit(2) only.
void on_signal(int sig) {
  int expected = 0;
  if (!g_signal.compare_exchange_strong(expected, sig)) _exit(128 + sig);  // the second one
  static const char kUsr1[] = "vchat-train: SIGUSR1: stopping after this step (saving first); again: exit now\n";
  static const char kTerm[] = "vchat-train: SIGTERM: stopping after this step (saving first); again: exit now\n";
  static const char kInt[] = "vchat-train: SIGINT: stopping after this step (saving first); again: exit now\n";
  const ssize_t rc = sig == SIGUSR1   ? write(STDERR_FILENO, kUsr1, sizeof kUsr1 - 1)
                     : sig == SIGTERM ? write(STDERR_FILENO, kTerm, sizeof kTerm - 1)
                                      : write(STDERR_FILENO, kInt, sizeof kInt - 1);
  (void)rc;
}

}  // namespace

static void handle(std::initializer_list<int> signals) {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // blocking reads and waits continue; the step loop polls the flag
  for (int sig : signals) sigaction(sig, &sa, nullptr);
}

void StopSignals::install_warning() { handle({SIGUSR1}); }
void StopSignals::install() { handle({SIGUSR1, SIGTERM, SIGINT}); }

int StopSignals::requested() { return g_signal.load(); }

void StopSignals::reset() { g_signal.store(0); }

const char* StopSignals::name(int sig) {
  switch (sig) {
    case SIGUSR1: return "SIGUSR1";
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
  }
  return "signal";
}

}  // namespace vchat
