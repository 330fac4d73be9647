// VCHAT_CHECK: precondition checks that stay on in release builds. They throw, so a bad
// shape in a test or a bad input at run time becomes a message, not a crash.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define VCHAT_CHECK(cond, msg)                                                   \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::ostringstream vchat_check_os_;                                        \
      vchat_check_os_ << __func__ << ": " << msg << " (" << #cond << ")";        \
      throw std::invalid_argument(vchat_check_os_.str());                        \
    }                                                                            \
  } while (0)

namespace vchat {

// A user-facing configuration mistake: the message names the option or key and its value.
// Apps turn it into exit code 2. (Here, at the bottom of the include graph, because every
// layer refuses configurations: grids, options, model files.)
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "--tp=0 must be at least 1".
inline void require_positive(long long value, const char* option) {
  if (value < 1) throw ConfigError(std::string(option) + "=" + std::to_string(value) + " must be at least 1");
}

}  // namespace vchat
