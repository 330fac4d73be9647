#include "chat/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace vchat::chat {

void validate(const SamplingOptions& o) {
  if (!(o.temperature >= 0)) throw std::invalid_argument("--temperature " + std::to_string(o.temperature) + " must be >= 0");
  if (o.top_k < 0) throw std::invalid_argument("--top-k " + std::to_string(o.top_k) + " must be >= 0");
  if (!(o.top_p > 0 && o.top_p <= 1)) throw std::invalid_argument("--top-p " + std::to_string(o.top_p) + " must be in (0, 1]");
  if (!(o.repetition_penalty > 0))
    throw std::invalid_argument("--repetition-penalty " + std::to_string(o.repetition_penalty) + " must be > 0");
  if (o.max_new_tokens <= 0) throw std::invalid_argument("--max-new-tokens " + std::to_string(o.max_new_tokens) + " must be > 0");
}

Sampler::Sampler(const SamplingOptions& o) : opt_(o), rng_(o.seed) { validate(o); }

int32_t Sampler::next(const Tensor& logits_t, const std::vector<int32_t>& history) {
  const int64_t V = logits_t.numel();
  std::vector<float> x(logits_t.data<float>(), logits_t.data<float>() + V);
  if (opt_.repetition_penalty != 1.f) {  // CTRL's penalty, as transformers applies it: once per distinct token
    std::vector<bool> seen(static_cast<size_t>(V), false);
    for (int32_t t : history)
      if (t >= 0 && t < V && !seen[t]) {
        seen[t] = true;
        x[t] = x[t] > 0 ? x[t] / opt_.repetition_penalty : x[t] * opt_.repetition_penalty;
      }
  }
  if (opt_.temperature == 0.f) return static_cast<int32_t>(std::max_element(x.begin(), x.end()) - x.begin());
  for (float& v : x) v /= opt_.temperature;
  // Candidates by decreasing logit (index order on ties, so runs are reproducible).
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return x[a] > x[b]; });
  // A temperature so small that logits overflow leaves no distribution to draw from: the
  // limit of sampling as the temperature goes to 0 is greedy.
  if (!std::isfinite(x[order[0]])) return order[0];
  size_t keep = order.size();
  if (opt_.top_k > 0) keep = std::min(keep, static_cast<size_t>(opt_.top_k));
  const float mx = x[order[0]];
  std::vector<double> p(keep);
  double sum = 0;
  for (size_t i = 0; i < keep; ++i) sum += p[i] = std::exp(static_cast<double>(x[order[i]] - mx));
  if (opt_.top_p < 1.f) {  // the smallest prefix whose mass reaches top_p (at least one token)
    double acc = 0;
    size_t n = 0;
    while (n < keep && (n == 0 || acc < opt_.top_p * sum)) acc += p[n++];
    keep = n;
    p.resize(keep);
  }
  std::discrete_distribution<size_t> pick(p.begin(), p.end());
  return order[pick(rng_)];
}

}  // namespace vchat::chat
