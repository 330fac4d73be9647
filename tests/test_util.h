// Shared test helpers: seeded random tensors, float64 dot products, gradient checking by
// central finite differences.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <stdlib.h>

#include <cmath>
#include <filesystem>
#include <stdexcept>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tensor.h"

namespace vchat::test {

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

// Checks analytical gradients of L = Σ forward() ⊙ r against central differences, on a
// sample of coordinates of every variable plus one random direction per variable.
// fp32 forward, float64 sums. FD noise scales with |L|, not with the coordinate, so the
// tolerance of one coordinate is relative to max(|its gradient|, 10% of the tensor's largest).
inline void check_gradients(const std::function<Tensor()>& forward, const std::function<void(const Tensor&)>& backward,
                            const std::vector<GradVar>& vars, uint64_t seed, int samples = 12, float h = 1e-2f,
                            double atol = 2e-3, double rtol = 2e-2) {
  std::mt19937_64 rng(seed);
  Tensor y0 = forward();
  Tensor r = randn(y0.shape(), rng);
  backward(r);
  auto loss = [&] { return dot(forward(), r); };
  for (const GradVar& v : vars) {
    Tensor g = v.grad().clone();
    ASSERT_EQ(g.numel(), v.value.numel()) << v.name;
    float* x = v.value.data<float>();
    std::uniform_int_distribution<int64_t> pick(0, v.value.numel() - 1);
    double gmax = 0;
    for (int64_t i = 0; i < g.numel(); ++i) gmax = std::max(gmax, std::fabs(double(g.data<float>()[i])));
    for (int s = 0; s < samples; ++s) {
      const int64_t i = pick(rng);
      const float keep = x[i];
      x[i] = keep + h;
      const double lp = loss();
      x[i] = keep - h;
      const double lm = loss();
      x[i] = keep;
      const double num = (lp - lm) / (2.0 * h), ana = g.data<float>()[i];
      EXPECT_NEAR(ana, num, atol + rtol * std::max({std::fabs(num), std::fabs(ana), 0.1 * gmax}))
          << v.name << "[" << i << "] analytical vs finite difference";
    }
    // Directional derivative along a random unit-scale direction d: Σ g·d vs FD.
    Tensor d = randn(v.value.shape(), rng, 1.f / std::sqrt(static_cast<float>(v.value.numel())));
    Tensor keep = v.value.clone();
    for (int64_t i = 0; i < v.value.numel(); ++i) x[i] = keep.data<float>()[i] + h * d.data<float>()[i];
    const double lp = loss();
    for (int64_t i = 0; i < v.value.numel(); ++i) x[i] = keep.data<float>()[i] - h * d.data<float>()[i];
    const double lm = loss();
    v.value.copy_from(keep);
    const double num = (lp - lm) / (2.0 * h), ana = dot(g, d);
    EXPECT_NEAR(ana, num, atol + rtol * std::max(std::fabs(num), std::fabs(ana))) << v.name << " directional";
  }
}

}  // namespace vchat::test
