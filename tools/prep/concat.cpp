#include "concat.h"

#include <numeric>
#include <random>
#include <utility>

#include "data/sample.h"

namespace vchat::prep {
namespace {

// Uniform draw from [0, n) without modulo bias: reject the lowest 2^64 mod n raw values so
// the rest is a whole number of copies of [0, n). std::uniform_int_distribution would do,
// but its algorithm differs between standard libraries, and prepared datasets must not.
uint64_t bounded(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // == 2^64 mod n
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

}  // namespace

std::vector<Conversation> concat_conversations(const std::vector<Conversation>& in, int max_group, uint64_t seed) {
  if (max_group <= 1) return in;
  std::mt19937_64 rng(seed);

  std::vector<size_t> order(in.size());
  std::iota(order.begin(), order.end(), size_t{0});
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[bounded(rng, i)]);

  std::vector<Conversation> out;
  for (size_t next = 0; next < order.size();) {
    const uint64_t want = 1 + bounded(rng, static_cast<uint64_t>(max_group));
    Conversation group = in[order[next++]];  // the first member is always taken
    for (uint64_t taken = 1; taken < want && next < order.size(); ++taken) {
      const Conversation& m = in[order[next]];
      if (group.images.size() + m.images.size() > static_cast<size_t>(data::kMaxImagesPerSample)) break;
      group.id += "+" + m.id;
      group.images.insert(group.images.end(), m.images.begin(), m.images.end());
      group.rounds.insert(group.rounds.end(), m.rounds.begin(), m.rounds.end());
      ++next;
    }
    out.push_back(std::move(group));
  }
  return out;
}

}  // namespace vchat::prep
