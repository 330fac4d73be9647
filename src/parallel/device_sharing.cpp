#include "parallel/device_sharing.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace vchat {

std::string shared_device(Comm& world, const std::string& mine) {
  constexpr size_t kRecord = 256;  // NUL-terminated, fixed size: one all_gather of bytes
  std::vector<char> own(kRecord, '\0'), all(kRecord * static_cast<size_t>(world.size()));
  std::memcpy(own.data(), mine.data(), std::min(mine.size(), kRecord - 1));
  world.all_gather(own.data(), all.data(), static_cast<int64_t>(kRecord), DType::u8);
  auto identity = [&](int r) { return std::string(all.data() + static_cast<size_t>(r) * kRecord); };
  for (int a = 0; a < world.size(); ++a)
    for (int b = a + 1; b < world.size(); ++b)
      if (identity(a) == identity(b))
        return "ranks " + std::to_string(a) + " and " + std::to_string(b) + " share GPU " + identity(a);
  return "";
}

}  // namespace vchat
