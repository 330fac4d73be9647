// Shared test helpers: seeded random tensors, float64 dot products, gradient checking by
// extrapolated finite differences with a bound on their rounding noise.
#pragma once
#include <sys/wait.h>

#include <cstdio>
#include <gtest/gtest.h>

#include <algorithm>
#include <stdlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <functional>
#include <ostream>
#include <sstream>
#include <random>
#include <string>
#include <vector>

#include "exec.h"
#include "ops.h"
#include "tensor.h"

namespace vchat::test {

// The CPU execution context, for ops and layers called directly on host tensors.
inline const ExecContext kCpu{};

// The GPU suite's tolerances for a kernel against its CPU op (norm-relative, expect_close):
// fp32 1e-5; bf16 1e-2, and 2e-2 for gradients through a bf16 backward.
struct Precision {
  DType dt;
  double tol, grad_tol;
  const char* name;
};
inline const Precision kPrecisions[] = {{DType::f32, 1e-5, 1e-5, "fp32"}, {DType::bf16, 1e-2, 2e-2, "bf16"}};

// bf16 on the host: the bits of f rounded to nearest even (NaN stays NaN), and back.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One sequence's modality row [L] for attention tests: optionally a few text tokens first,
// then image runs of the given lengths (cycled) each followed by 1..max_text text tokens,
// then `pad` pad tokens at the end.
inline std::vector<uint8_t> modality_row(int64_t L, bool text_first, const std::vector<int64_t>& runs, int64_t pad,
                                         std::mt19937& rng, int64_t max_text = 9) {
  std::vector<uint8_t> m;
  if (text_first)
    for (int64_t t = 0, n = 1 + rng() % 5; t < n; ++t) m.push_back(ops::kText);
  for (size_t r = 0; static_cast<int64_t>(m.size()) < L - pad; ++r) {
    const int64_t run = runs[r % runs.size()];
    for (int64_t t = 0; t < run && static_cast<int64_t>(m.size()) < L - pad; ++t) m.push_back(ops::kImage);
    for (int64_t t = 0, n = 1 + static_cast<int64_t>(rng() % max_text);
         t < n && static_cast<int64_t>(m.size()) < L - pad; ++t)
      m.push_back(ops::kText);
  }
  m.resize(L, ops::kPad);
  return m;
}

// An attention test's shape and modality layout: B sequences of L tokens, image runs of
// the given lengths (cycled) between text stretches of 1..max_text tokens, the first
// sequence text-first or not (the others alternate) and ending in `pad` pad tokens.
struct AttnLayout {
  ops::AttnMode mode;
  int64_t B, L, H, KV, hd;
  std::vector<int64_t> runs;  // image run lengths
  bool text_first;
  int64_t pad;  // on the first sequence
  const char* what;
  int64_t max_text = 9;  // text tokens between image runs, at most
};
// Its modality tensor [B, L] (u8, host).
inline Tensor layout_modalities(const AttnLayout& a, std::mt19937& rng) {
  std::vector<uint8_t> mm;
  for (int64_t b = 0; b < a.B; ++b) {
    const std::vector<uint8_t> row =
        modality_row(a.L, a.text_first || b % 2, a.runs, b == 0 ? a.pad : 0, rng, a.max_text);
    mm.insert(mm.end(), row.begin(), row.end());
  }
  return Tensor::from_vector(mm, {a.B, a.L});
}

// Every element of `got` finite (written: outputs are poisoned first) and
// ||got - want|| <= tol max(||want||, floor): how the CUDA ops, real or emulated, are held to
// the CPU's. The floor is for a result that is zero by cancellation (an attention query that
// sees one key has dq = p (dP - D) K = 0, which another summation order leaves at rounding
// noise): the norm below which `want` counts as zero.
inline void expect_close(const Tensor& got, const Tensor& want, double tol, const std::string& what, double floor = 0) {
  const std::vector<float> g = got.to_vector_f32(), w = want.to_vector_f32();
  ASSERT_EQ(g.size(), w.size()) << what;
  double num = 0, den = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    ASSERT_TRUE(std::isfinite(g[i])) << what << ": element " << i << " not written (or not finite): " << g[i];
    num += (double(g[i]) - w[i]) * (double(g[i]) - w[i]);
    den += double(w[i]) * w[i];
  }
  const double bound = tol * std::max({std::sqrt(den), floor, 1e-30});
  if (std::sqrt(num) <= bound) return;
  // Where it is off: a wrong fragment lane mapping, tile edge or mask leaves its errors in a
  // pattern of indices, which the first GPU to run a kernel should show at once. Elements
  // off by more than the bound's share of one element's RMS are counted, the first listed.
  const double per = bound / std::sqrt(double(std::max<size_t>(g.size(), 1)));
  const Shape& shape = got.shape();
  std::ostringstream where;
  size_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::abs(double(g[i]) - w[i]) <= per) continue;
    if (++bad > 8) continue;
    std::vector<int64_t> at(shape.size());
    for (size_t d = shape.size(), r = i; d-- > 0;) {
      at[d] = static_cast<int64_t>(r % static_cast<size_t>(shape[d]));
      r /= static_cast<size_t>(shape[d]);
    }
    where << "\n  [";
    for (size_t d = 0; d < at.size(); ++d) where << (d ? "," : "") << at[d];
    where << "] got " << g[i] << ", want " << w[i];
  }
  ADD_FAILURE() << what << ": ||got - want|| = " << std::sqrt(num) << " > " << bound << " (tol " << tol << " of "
                << std::max(std::sqrt(den), floor) << "); " << bad << " of " << g.size()
                << " elements off by more than " << per << ", the first:" << where.str();
}
inline double norm(const Tensor& t) {
  double s = 0;
  for (float x : t.to_vector_f32()) s += double(x) * x;
  return std::sqrt(s);
}

// A fresh directory under the temp dir, removed with its contents at scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "vchat") {
    std::string tmpl = (std::filesystem::temp_directory_path() / (prefix + "_XXXXXX")).string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
};

// Runs `cmd` in a shell; returns stdout and stderr together, the exit status in *code.
inline std::string sh(const std::string& cmd, int* code = nullptr) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int st = pclose(p);
  if (code) *code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// f() must throw an E whose message contains `needle`.
template <class E>
void expect_throw_naming(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "accepted; expected: " << needle;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
inline void expect_invalid_argument(const std::function<void()>& f, const std::string& needle) {
  expect_throw_naming<std::invalid_argument>(f, needle);
}
inline void expect_runtime_error(const std::function<void()>& f, const std::string& needle) {
  expect_throw_naming<std::runtime_error>(f, needle);
}

inline Tensor randn(Shape shape, std::mt19937_64& rng, float stddev = 1.f) {
  Tensor t = Tensor::empty(std::move(shape));
  std::normal_distribution<float> g(0.f, stddev);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = g(rng);
  return t;
}

inline void fill_randn(const Tensor& t, std::mt19937_64& rng, float stddev = 1.f, float mean = 0.f) {
  std::normal_distribution<float> g(mean, stddev);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = g(rng);
}

inline void scale_by(const Tensor& t, double s) {
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(t.data<float>()[i] * s);
}

inline double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  const float *x = a.data<float>(), *y = b.data<float>();
  for (int64_t i = 0; i < a.numel(); ++i) s += static_cast<double>(x[i]) * y[i];
  return s;
}

// ||a - b|| / max(||b||, tiny): the norm-relative error used against the references.
inline double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

// One differentiable variable of a grad check: its value (perturbed in place) and where
// backward left its analytical gradient.
struct GradVar {
  std::string name;
  Tensor value;
  std::function<Tensor()> grad;  // read after backward
};

// One comparison of a gradient check that did not hold.
struct GradIssue {
  std::string what;    // "<var> along its gradient", "<var> random direction", "<var>[i]", "<var> power"
  std::string detail;  // the numbers
};
inline std::ostream& operator<<(std::ostream& os, const GradIssue& g) { return os << g.what << ": " << g.detail; }

// Checks analytical gradients of L = Σ forward() ⊙ r (r random, fixed) against finite
// differences: along the analytical gradient itself (catches a wrong scale: a gradient off
// by 3% fails), along one random direction (catches a wrong direction) and on `samples`
// random coordinates of every variable.
//
// Why it does not depend on the CPU: the forward runs in fp32, whose rounding differs
// between machines (OpenBLAS picks AVX-512 or AVX2 kernels, other summation orders), so
// every finite difference carries rounding noise. The check bounds that noise instead of
// hoping it is small:
//  - L is summed in float64 from fp32 outputs; its rounding error is at most
//    δL = kNoise · eps32 · S with S = Σ|y_i r_i| (each output is good to a few ulps; kNoise
//    = 3 was measured to cover the worst case of every test here with a 5x margin on both
//    AVX-512 and AVX2 kernels);
//  - the derivative is Richardson's extrapolation R = (4·D(h/2) − D(h)) / 3 of central
//    differences D, whose truncation error is O(h⁴), so h can be large (3e-2) and the noise,
//    which grows as δL/h, small: |noise of R| ≤ 3·δL/h;
//  - |R − D(h/2)|, the h² term that R removed, bounds what truncation is left;
//  - a comparison passes when |ana − R| ≤ rtol·max(|ana|, |R|) + 3·δL/h + |R − D(h/2)|, rtol 1e-2.
// The check also proves its own power: along the gradient, the error bound (3·δL/h plus the
// truncation term) must stay under 1.5% of the derivative, so the tolerance there is under
// 2.5% and a gradient 3% off cannot pass. A set-up too noisy for that fails (as
// "<var> power") instead of passing vacuously; only a gradient that is zero within the bound
// (a key bias, which softmax ignores) has no scale to check.
inline std::vector<GradIssue> grad_check(const std::function<Tensor()>& forward,
                                         const std::function<void(const Tensor&)>& backward,
                                         const std::vector<GradVar>& vars, uint64_t seed, int samples = 12,
                                         double h = 3e-2) {
  constexpr double kNoise = 3.0, kEps32 = 1.1920929e-7, kRtol = 1e-2, kPower = 1.5e-2;
  std::mt19937_64 rng(seed);
  Tensor y0 = forward();
  Tensor r = randn(y0.shape(), rng);
  double S = 0;
  for (int64_t i = 0; i < y0.numel(); ++i) S += std::fabs(double(y0.data<float>()[i]) * r.data<float>()[i]);
  const double dL = kNoise * kEps32 * S, noise = 3 * dL / h;
  backward(r);
  auto loss = [&] { return dot(forward(), r); };

  std::vector<GradIssue> issues;
  for (const GradVar& v : vars) {
    Tensor g = v.grad().clone();
    if (g.numel() != v.value.numel()) {
      issues.push_back({v.name + " shape", "gradient has " + std::to_string(g.numel()) + " elements, value " +
                                               std::to_string(v.value.numel())});
      continue;
    }
    float* x = v.value.data<float>();
    const Tensor keep = v.value.clone();
    // d/dt L(x + t·dir) by extrapolated central differences; dir = nullptr: coordinate i.
    auto derivative = [&](const float* dir, int64_t i, double* trunc) {
      auto at = [&](double t) {
        if (dir)
          for (int64_t j = 0; j < v.value.numel(); ++j) x[j] = keep.data<float>()[j] + static_cast<float>(t * dir[j]);
        else
          x[i] = keep.data<float>()[i] + static_cast<float>(t);
        const double l = loss();
        v.value.copy_from(keep);
        return l;
      };
      const double d1 = (at(h) - at(-h)) / (2 * h), d2 = (at(h / 2) - at(-h / 2)) / h;
      const double rich = (4 * d2 - d1) / 3;
      *trunc = std::fabs(rich - d2);
      return rich;
    };
    auto compare = [&](const std::string& what, double ana, double num, double trunc) {
      const double tol = kRtol * std::max(std::fabs(ana), std::fabs(num)) + noise + trunc;
      if (!(std::fabs(ana - num) <= tol)) {
        std::ostringstream os;
        os << "analytical " << ana << " vs finite difference " << num << " (tolerance " << tol << ")";
        issues.push_back({what, os.str()});
      }
    };

    // 1. Along the analytical gradient (a random direction if it is all zero): the
    //    directional derivative is |g| itself, the largest signal there is.
    Tensor d = randn(v.value.shape(), rng, 1.f / std::sqrt(static_cast<float>(v.value.numel())));
    const double gnorm = std::sqrt(dot(g, g));
    Tensor u = gnorm > 0 ? g.clone() : d.clone();
    if (gnorm > 0) scale_by(u, 1.0 / gnorm);
    double trunc = 0;
    double num = derivative(u.data<float>(), 0, &trunc);
    compare(v.name + " along its gradient", dot(g, u), num, trunc);
    const bool zero = std::fabs(num) <= noise + trunc && gnorm <= noise + trunc;  // nothing to measure a scale of
    if (!zero && !(noise + trunc <= kPower * std::fabs(num))) {
      std::ostringstream os;
      os << "finite-difference error bound " << noise + trunc << " exceeds " << kPower * 100 << "% of the derivative " << num
         << " along the gradient: too noisy to catch a 3% error (try another h or larger gradients)";
      issues.push_back({v.name + " power", os.str()});
    }
    // 2. Along a random unit direction.
    num = derivative(d.data<float>(), 0, &trunc);
    compare(v.name + " random direction", dot(g, d), num, trunc);
    // 3. Random coordinates.
    std::uniform_int_distribution<int64_t> pick(0, v.value.numel() - 1);
    for (int s = 0; s < samples; ++s) {
      const int64_t i = pick(rng);
      num = derivative(nullptr, i, &trunc);
      compare(v.name + "[" + std::to_string(i) + "]", g.data<float>()[i], num, trunc);
    }
  }
  return issues;
}

// grad_check as a test assertion: one failure per comparison that did not hold.
inline void check_gradients(const std::function<Tensor()>& forward, const std::function<void(const Tensor&)>& backward,
                            const std::vector<GradVar>& vars, uint64_t seed, int samples = 12, double h = 3e-2) {
  for (const GradIssue& issue : grad_check(forward, backward, vars, seed, samples, h)) ADD_FAILURE() << issue;
}

}  // namespace vchat::test
