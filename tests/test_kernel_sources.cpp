// Every CUDA kernel of src/cuda/ also runs on the CPU in make test (docs/GPU.md "Every kernel
// on the CPU"), which holds only while each kernel lives in a header that the emulated
// tests (tests/test_*_emulated.cpp, under tests/emu/cuda_emu.h) compile. This test reads
// the sources and names each kernel that escapes: a `__global__` function or a `__device__`
// lambda in a .cu file (nvcc-only, so no emulated test can run it), or a header of device
// code (`__global__` or `__device__`) that no emulated test reaches through its includes.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

// The file's lines, without // comments (a comment may name __global__).
std::vector<std::string> code_lines(const fs::path& file) {
  std::ifstream in(file);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    const auto c = line.find("//");
    out.push_back(c == std::string::npos ? line : line.substr(0, c));
  }
  return out;
}

// The quoted includes of a file, resolved against its own directory, then src/, then tests/.
std::vector<fs::path> resolved_includes(const fs::path& file, const fs::path& src, const fs::path& tests) {
  static const std::regex inc(R"re(^\s*#\s*include\s*"([^"]+)")re");
  std::vector<fs::path> out;
  std::smatch m;
  for (const std::string& line : code_lines(file)) {
    if (!std::regex_search(line, m, inc)) continue;
    for (const fs::path& base : {file.parent_path(), src, tests})
      if (fs::exists(base / m[1].str())) {
        out.push_back(fs::weakly_canonical(base / m[1].str()));
        break;
      }
  }
  return out;
}

// What escapes the emulated tests, as "cuda/file:line: ..." or "cuda/file: ...".
std::vector<std::string> kernels_outside_the_emulator(const fs::path& src, const fs::path& tests) {
  static const std::regex global(R"(\b__global__\b)"), device(R"(\b__device__\b)"), device_lambda(R"(\]\s*__device__)");
  std::vector<std::string> bad;
  // Every header the emulated tests reach.
  std::set<fs::path> reached;
  std::vector<fs::path> todo;
  for (const auto& e : fs::directory_iterator(tests)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("test_", 0) == 0 && name.size() > 13 && name.substr(name.size() - 13) == "_emulated.cpp")
      todo.push_back(fs::weakly_canonical(e.path()));
  }
  while (!todo.empty()) {
    const fs::path f = todo.back();
    todo.pop_back();
    if (!reached.insert(f).second) continue;
    for (const fs::path& i : resolved_includes(f, src, tests)) todo.push_back(i);
  }
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(src / "cuda")) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const fs::path& f : files) {
    const std::string ext = f.extension().string(), rel = "cuda/" + f.filename().string();
    const std::vector<std::string> lines = code_lines(f);
    bool device_code = false;
    for (size_t n = 0; n < lines.size(); ++n) {
      const bool g = std::regex_search(lines[n], global), l = std::regex_search(lines[n], device_lambda);
      device_code = device_code || g || std::regex_search(lines[n], device);
      if (ext == ".cu" && (g || l))
        bad.push_back(rel + ":" + std::to_string(n + 1) + (g ? ": a __global__ function" : ": a __device__ lambda") +
                      " in a .cu file: move it into a *_kernels.cuh header with an emulated test");
    }
    if (ext == ".cuh" && device_code && !reached.count(fs::weakly_canonical(f)))
      bad.push_back(rel + ": device code that no tests/test_*_emulated.cpp includes");
  }
  return bad;
}

TEST(KernelSources, EveryCudaKernelIsInAHeaderThatAnEmulatedTestRuns) {
  const fs::path root(VCHAT_SOURCE_DIR);
  ASSERT_TRUE(fs::is_directory(root / "src" / "cuda")) << root;
  const auto bad = kernels_outside_the_emulator(root / "src", root / "tests");
  std::ostringstream all;
  for (const auto& b : bad) all << "\n  " << b;
  EXPECT_TRUE(bad.empty()) << bad.size() << " kernel source(s) outside the CPU emulator's tests:" << all.str();
}

// The checker itself, on a tree with two device-code headers an emulated test includes
// (through tests/emu/), one that only a GPU test includes, a host-only header, a .cu file with
// a kernel, one with a device lambda, and one whose kernel is only named in a comment.
TEST(KernelSources, TheCheckerFindsKernelsTheEmulatorCannotRun) {
  const fs::path root = fs::temp_directory_path() /
                        ("vchat_kernel_sources_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()));
  fs::remove_all(root);
  const fs::path src = root / "src", tests = root / "tests";
  fs::create_directories(src / "cuda");
  fs::create_directories(tests / "emu");
  std::ofstream(src / "cuda" / "a_kernels.cuh") << "template <class F>\n__global__ void each(F f) {}\n";
  std::ofstream(src / "cuda" / "b_kernels.cuh") << "__global__ void lonely() {}\n";
  std::ofstream(src / "cuda" / "storage.cuh") << "__device__ inline float ld(const float* p) { return *p; }\n";
  std::ofstream(src / "cuda" / "host.cuh") << "inline int grid_for(int n) { return n; }  // no __device__\n";
  std::ofstream(src / "cuda" / "ok.cu") << "#include \"cuda/a_kernels.cuh\"\n// was a __global__ once\n";
  std::ofstream(src / "cuda" / "k.cu") << "#include \"cuda/b_kernels.cuh\"\n\n__global__ void k() {}\n";
  std::ofstream(src / "cuda" / "l.cu") << "void f() {\n  launch([=] __device__(int i) {});\n}\n";
  std::ofstream(tests / "emu" / "launches.h") << "#include \"cuda/a_kernels.cuh\"\n#include \"cuda/storage.cuh\"\n";
  std::ofstream(tests / "test_a_emulated.cpp") << "#include \"emu/launches.h\"\n";
  std::ofstream(tests / "test_b.cpp") << "#include \"cuda/b_kernels.cuh\"\n";  // not an emulated test
  const auto bad = kernels_outside_the_emulator(src, tests);
  fs::remove_all(root);
  ASSERT_EQ(bad.size(), 3u);
  EXPECT_EQ(bad[0], "cuda/b_kernels.cuh: device code that no tests/test_*_emulated.cpp includes");
  EXPECT_EQ(bad[1],
            "cuda/k.cu:3: a __global__ function in a .cu file: move it into a *_kernels.cuh header with an "
            "emulated test");
  EXPECT_EQ(bad[2],
            "cuda/l.cu:2: a __device__ lambda in a .cu file: move it into a *_kernels.cuh header with an "
            "emulated test");
}

}  // namespace
