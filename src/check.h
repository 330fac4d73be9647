// VCHAT_CHECK: precondition checks that stay on in release builds. They throw, so a bad
// shape in a test or a bad input at run time becomes a message, not a crash.
#pragma once
#include <sstream>
#include <stdexcept>

#define VCHAT_CHECK(cond, msg)                                                   \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::ostringstream vchat_check_os_;                                        \
      vchat_check_os_ << __func__ << ": " << msg << " (" << #cond << ")";        \
      throw std::invalid_argument(vchat_check_os_.str());                        \
    }                                                                            \
  } while (0)
