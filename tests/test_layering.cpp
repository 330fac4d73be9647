// The include graph of src/ runs one way (README "How the parts fit"): ops ← nn ← parallel ← model ←
// data ← checkpoint, chat ← train ← apps. A layer includes its own and lower layers only, so
// the layers (Linear, norms, parameters) know no communicator and the parallel code knows
// no model. This test reads every source file and names each include that points up.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <algorithm>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

// Each directory of src/ and its layer; "" is src/ itself (tensor.h, ops.h, exec.h, ...).
// cpu/ and cuda/ are the ops' two backends; io/ reads files into tensors.
const std::map<std::string, int>& layers() {
  static const std::map<std::string, int> m = {
      {"", 0},      {"cpu", 0},  {"cuda", 0},       {"io", 0},   {"nn", 1},    {"parallel", 2},
      {"model", 3}, {"data", 4}, {"checkpoint", 5}, {"chat", 5}, {"train", 6}, {"apps", 7},
  };
  return m;
}

// The directory of a path relative to src/ ("model/llama.h" -> "model", "ops.h" -> "").
std::string top_dir(const std::string& rel) {
  const auto slash = rel.find('/');
  return slash == std::string::npos ? "" : rel.substr(0, slash);
}

// The quoted includes of one file, with their line numbers.
std::vector<std::pair<int, std::string>> quoted_includes(const fs::path& file) {
  std::ifstream in(file);
  static const std::regex inc(R"re(^\s*#\s*include\s*"([^"]+)")re");
  std::vector<std::pair<int, std::string>> out;
  std::string line;
  std::smatch m;
  for (int n = 1; std::getline(in, line); ++n)
    if (std::regex_search(line, m, inc)) out.emplace_back(n, m[1].str());
  return out;
}

// Every include of a file under `src` that points to a higher layer, or a file in a
// directory the table does not place, as "file:line: includes X (layer a -> b)".
std::vector<std::string> upward_includes(const fs::path& src) {
  std::vector<std::string> bad;
  for (const auto& e : fs::recursive_directory_iterator(src)) {
    if (!e.is_regular_file()) continue;
    const std::string ext = e.path().extension().string();
    if (ext != ".h" && ext != ".cpp" && ext != ".cu" && ext != ".cuh") continue;
    const std::string rel = fs::relative(e.path(), src).generic_string();
    const auto from = layers().find(top_dir(rel));
    if (from == layers().end()) {
      bad.push_back(rel + ": src/" + top_dir(rel) + "/ has no layer in test_layering.cpp's table: give it one");
      continue;
    }
    for (const auto& [line, target] : quoted_includes(e.path())) {
      // An include relative to the file's own directory (none today) stays in its layer.
      if (!fs::exists(src / target)) continue;
      const auto to = layers().find(top_dir(target));
      if (to == layers().end() || to->second > from->second) {
        std::ostringstream os;
        os << rel << ":" << line << ": includes \"" << target << "\" (layer " << from->first << "=" << from->second
           << " -> " << (to == layers().end() ? "unplaced" : to->first + "=" + std::to_string(to->second)) << ")";
        bad.push_back(os.str());
      }
    }
  }
  return bad;
}

TEST(Layering, NoIncludeInSrcPointsToAHigherLayer) {
  const fs::path src = fs::path(VCHAT_SOURCE_DIR) / "src";
  ASSERT_TRUE(fs::is_directory(src)) << src;
  std::ostringstream all;
  const auto bad = upward_includes(src);
  for (const auto& b : bad) all << "\n  " << b;
  EXPECT_TRUE(bad.empty()) << bad.size() << " include(s) point up the layers:" << all.str();
}

// The checker itself: a tree with an upward include, one within a layer, one down, and a
// directory the table does not know.
TEST(Layering, TheCheckerFindsAnUpwardIncludeAndAnUnplacedDirectory) {
  const fs::path root = fs::temp_directory_path() /
                        ("vchat_layering_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()));
  fs::remove_all(root);
  const fs::path src = root / "src";
  fs::create_directories(src / "nn");
  fs::create_directories(src / "parallel");
  fs::create_directories(src / "gadgets");
  std::ofstream(src / "tensor.h") << "#pragma once\n";
  std::ofstream(src / "parallel" / "comm.h") << "#include \"tensor.h\"\n";
  std::ofstream(src / "nn" / "params.h") << "#include \"tensor.h\"\n";
  std::ofstream(src / "nn" / "linear.h")
      << "#include <vector>\n#include \"nn/params.h\"\n\n#include \"parallel/comm.h\"\n";
  std::ofstream(src / "gadgets" / "g.cpp") << "#include \"tensor.h\"\n";
  auto bad = upward_includes(src);
  std::sort(bad.begin(), bad.end());
  fs::remove_all(root);
  ASSERT_EQ(bad.size(), 2u);
  EXPECT_EQ(bad[0], "gadgets/g.cpp: src/gadgets/ has no layer in test_layering.cpp's table: give it one");
  EXPECT_EQ(bad[1], "nn/linear.h:4: includes \"parallel/comm.h\" (layer nn=1 -> parallel=2)");
}

}  // namespace
