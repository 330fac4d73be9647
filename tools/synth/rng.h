// The synth tool's random source. std::mt19937_64's output sequence is fixed by the
// standard, but std::uniform_int_distribution & co. are not (libstdc++ and libc++ map the
// same bits to different values), so the draws are done here by hand: the same seed gives
// byte-identical data on any standard library.
#pragma once
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace vchat::synth {

// SplitMix64 finalizer: turns (seed, index) into well-spread, independent engine seeds.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}

  // Each sample gets its own stream, so a sample's content depends only on (seed, index):
  // samples can be generated in parallel and N does not change the first samples.
  static Rng for_sample(uint64_t seed, uint64_t index) {
    return Rng(splitmix64(splitmix64(seed) ^ (index + 1) * 0xD1B54A32D192ED03ull));
  }

  // Uniform integer in [lo, hi] (inclusive), by rejection: no modulo bias.
  int uniform(int lo, int hi) {
    if (hi <= lo) return lo;
    const uint64_t range = static_cast<uint64_t>(static_cast<int64_t>(hi) - lo) + 1;
    const uint64_t limit = UINT64_MAX - UINT64_MAX % range;
    uint64_t x;
    do x = engine_(); while (x >= limit);
    return lo + static_cast<int>(x % range);
  }

  // True with probability p (53-bit resolution).
  bool chance(double p) { return static_cast<double>(engine_() >> 11) * 0x1.0p-53 < p; }

  template <class T>
  const T& pick(const std::vector<T>& v) { return v[static_cast<size_t>(uniform(0, static_cast<int>(v.size()) - 1))]; }

  // Fisher–Yates with our own uniform (std::shuffle's draws are implementation-defined).
  template <class T>
  void shuffle(std::vector<T>& v) {
    for (int i = static_cast<int>(v.size()) - 1; i > 0; --i) std::swap(v[i], v[uniform(0, i)]);
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace vchat::synth
