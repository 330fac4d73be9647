// The precision policy and the device choice (--device, --precision): one table of which
// dtype each kind of tensor has, and options that say exactly what is missing.
#include <gtest/gtest.h>

#include <functional>

#include <cmath>
#include <limits>
#include <vector>

#include "model/config.h"
#include "model/precision.h"
#include "ops.h"

using namespace vchat;

namespace {
void expect_config_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one containing: " << needle;
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

// bf16 is a compute format only: master weights, gradients, Adam state and statistics stay
// fp32, and only bf16 needs a working copy next to the master weights.
TEST(Precision, PolicyKeepsEverythingThatAccumulatesInFp32) {
  for (Precision p : {Precision::fp32, Precision::bf16}) {
    const PrecisionPolicy pol = PrecisionPolicy::of(p);
    EXPECT_EQ(pol.precision, p);
    EXPECT_EQ(pol.compute, p == Precision::bf16 ? DType::bf16 : DType::f32);
    EXPECT_EQ(pol.master, DType::f32);
    EXPECT_EQ(pol.grad, DType::f32);
    EXPECT_EQ(pol.optimizer_state, DType::f32);
    EXPECT_EQ(pol.statistics, DType::f32);
    EXPECT_EQ(pol.working_copy(), p == Precision::bf16);
  }
  EXPECT_STREQ(precision_name(Precision::bf16), "bf16");
  EXPECT_STREQ(precision_name(Precision::fp32), "fp32");
}

TEST(Precision, AutoDevicePicksCudaOnlyWhenBuiltWithItAndAGpuIsVisible) {
  EXPECT_EQ(resolve_device("auto", true, 1), Device::cuda);
  EXPECT_EQ(resolve_device("auto", true, 0), Device::cpu);
  EXPECT_EQ(resolve_device("auto", false, 4), Device::cpu);
  EXPECT_EQ(resolve_device("cpu", true, 8), Device::cpu);
  EXPECT_EQ(resolve_device("cuda", true, 1), Device::cuda);
  expect_config_error([] { resolve_device("cuda", false, 0); }, "--device=cuda: this build has no CUDA backend");
  expect_config_error([] { resolve_device("cuda", true, 0); }, "--device=cuda: no CUDA device is visible");
  expect_config_error([] { resolve_device("gpu", true, 1); }, "--device=gpu is not one of");
}

TEST(Precision, Bf16OnlyOnCudaAndAutoFollowsTheDevice) {
  EXPECT_EQ(resolve_precision("auto", Device::cuda), Precision::bf16);
  EXPECT_EQ(resolve_precision("auto", Device::cpu), Precision::fp32);
  EXPECT_EQ(resolve_precision("fp32", Device::cuda), Precision::fp32);
  EXPECT_EQ(resolve_precision("bf16", Device::cuda), Precision::bf16);
  expect_config_error([] { resolve_precision("bf16", Device::cpu); }, "--precision=bf16 needs --device cuda");
  expect_config_error([] { resolve_precision("fp16", Device::cuda); }, "--precision=fp16 is not one of");
}

// This build (the CPU one in make test) reports what it has; without the CUDA backend no GPU
// is ever visible, so auto stays on the CPU. The CUDA build's twin is in the GPU suite
// (CudaModel.ThisBuildReportsCudaAndAutoPicksTheGpu).
TEST(Precision, ThisBuildReportsItsBackend) {
#ifdef VCHAT_WITH_CUDA
  EXPECT_TRUE(built_with_cuda());
#else
  EXPECT_FALSE(built_with_cuda());
  EXPECT_EQ(visible_gpus(), 0);
  EXPECT_EQ(resolve_device("auto", built_with_cuda(), visible_gpus()), Device::cpu);
#endif
}

// The working copy's rounding: f32 -> bf16 to nearest, ties to even; bf16 -> f32 exact.
// MFU's peak is the data sheet's for the chip's generation, not one chip's scaled by SMs
// (an A100 scaled from an H100 would claim 809 bf16 TFLOP/s, 2.6x its 312).
TEST(Precision, GpuPeakIsTheDataSheetsDenseFigureOfTheArchitecture) {
  EXPECT_NEAR(gpu_peak_flops_of(80, 108, Precision::bf16), 312e12, 1e9) << "A100 SXM";
  EXPECT_NEAR(gpu_peak_flops_of(80, 108, Precision::fp32), 19.5e12, 1e9) << "A100 SXM";
  EXPECT_NEAR(gpu_peak_flops_of(90, 132, Precision::bf16), 989.4e12, 1e9) << "H100/H200 SXM";
  EXPECT_NEAR(gpu_peak_flops_of(90, 132, Precision::fp32), 66.9e12, 1e9) << "H100/H200 SXM";
  EXPECT_NEAR(gpu_peak_flops_of(90, 114, Precision::bf16), 989.4e12 * 114 / 132, 1e9) << "H100 PCIe: fewer SMs";
  EXPECT_NEAR(gpu_peak_flops_of(80, 54, Precision::bf16), 156e12, 1e9) << "half an A100's SMs (a MIG slice)";
}

TEST(Precision, CastRoundsToNearestEvenAndBack) {
  const float h = 1.f / 256;  // half a bf16 step at 1.0 (steps of 2^-7)
  const std::vector<float> in = {1.f, 1.f + h, 1.f + 3 * h, 1.f + 1.1f * h, -2.5f, 0.f, 3.0e38f,
                                 std::numeric_limits<float>::quiet_NaN()};
  const Tensor src = Tensor::from_vector(in, {8}), b16 = Tensor::empty({8}, DType::bf16), back = Tensor::empty({8});
  ops::cast(ExecContext::cpu(), src, b16);
  ops::cast(ExecContext::cpu(), b16, back);
  const std::vector<float> got = back.to_vector_f32();
  EXPECT_EQ(got[0], 1.f);
  EXPECT_EQ(got[1], 1.f);              // tie: to the even mantissa (1.0)
  EXPECT_EQ(got[2], 1.f + 4 * h);      // tie between 1+2h and 1+4h: to 1+4h (even)
  EXPECT_EQ(got[3], 1.f + 2 * h);      // above the tie: up
  EXPECT_EQ(got[4], -2.5f);            // representable: exact
  EXPECT_EQ(got[5], 0.f);
  EXPECT_NEAR(got[6], 3.0e38f, 3.0e38f / 128);
  EXPECT_TRUE(std::isnan(got[7]));
  // The same dtype is a copy; sizes must agree.
  const Tensor copy = Tensor::empty({8});
  ops::cast(ExecContext::cpu(), src, copy);
  EXPECT_EQ(copy.to_vector_f32()[3], in[3]);
  EXPECT_THROW(ops::cast(ExecContext::cpu(), src, Tensor::empty({7}, DType::bf16)), std::invalid_argument);
}
