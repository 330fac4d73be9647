// Checkpoint file I/O against the disk's raw bandwidth, in one process and one run:
//   raw     write(2) of the same bytes in 4 MiB blocks + fsync (what `dd conv=fsync` does)
//   image   build_rank_image: the HDF5 rank file of those bytes as `--pieces` tensors, in memory
//   write   write_rank_image: that image to disk (O_DIRECT where possible) + fsync, hashed on
//           the way (the hashing is timed apart)
//   read    RankFileReader: every piece read back
// Usage: vchat-bench-ckpt-io --dir DIR [--mb 384] [--pieces 60] [--reps 3]
// Prints one JSON line per repetition; bench/run_ckpt_bench.sh turns them into RESULTS.md.
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/rank_file.h"

using namespace vchat;
using clk = std::chrono::steady_clock;

static double since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

int main(int argc, char** argv) {
  std::string dir;
  int64_t mb = 384, n_pieces = 60, reps = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--dir") dir = argv[i + 1];
    else if (a == "--mb") mb = std::atoll(argv[i + 1]);
    else if (a == "--pieces") n_pieces = std::atoll(argv[i + 1]);
    else if (a == "--reps") reps = std::atoll(argv[i + 1]);
    else {
      std::fprintf(stderr, "vchat-bench-ckpt-io: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (dir.empty() || mb <= 0 || n_pieces <= 0) {
    std::fprintf(stderr, "usage: vchat-bench-ckpt-io --dir DIR [--mb 384] [--pieces 60] [--reps 3]\n");
    return 2;
  }
  std::filesystem::create_directories(dir);
  const int64_t n = mb * (1 << 20) / 4, per = n / n_pieces;
  std::vector<float> data(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) data[i] = static_cast<float>(i % 1000) * 1e-3f;
  std::vector<ckpt::PieceRef> pieces;
  std::vector<const float*> ptrs;
  for (int64_t p = 0; p < n_pieces; ++p) {
    ShardSpec whole;
    whole.full = {per};
    pieces.push_back({"t" + std::to_string(p), StateKind::value, whole, 0, per});
    ptrs.push_back(data.data() + p * per);
  }
  const double bytes = static_cast<double>(per * n_pieces) * 4;
  ckpt::ImageBuffer buffer;  // reused, as the saver does
  for (int64_t r = 0; r < reps; ++r) {
    const std::string raw = dir + "/raw.bin", h5 = dir + "/rank.h5";
    std::filesystem::remove(raw);
    std::filesystem::remove(h5);
    auto t0 = clk::now();
    const int fd = ::open(raw.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const char* p = reinterpret_cast<const char*>(data.data());
    for (double done = 0; done < bytes;) {
      const size_t chunk = static_cast<size_t>(std::min(bytes - done, 4.0 * (1 << 20)));
      if (::write(fd, p + static_cast<size_t>(done), chunk) != static_cast<ssize_t>(chunk)) return 1;
      done += chunk;
    }
    ::fsync(fd);
    ::close(fd);
    const double t_raw = since(t0);
    std::filesystem::remove(raw);

    t0 = clk::now();
    const ckpt::RankImage image = ckpt::build_rank_image(pieces, ptrs, 0, 0, nlohmann::json::object(), buffer);
    const double t_image = since(t0);
    const ckpt::WriteStats w = ckpt::write_rank_image(h5, image);
    t0 = clk::now();
    ckpt::RankFileReader reader(h5);
    std::vector<float> back(static_cast<size_t>(per));
    for (const auto& piece : pieces) reader.read(piece, 0, per, back.data());
    const double t_read = since(t0);
    std::printf("%s\n", nlohmann::json{{"mb", bytes / 1e6},
                                       {"raw_mb_s", bytes / 1e6 / t_raw},
                                       {"image_mb_s", bytes / 1e6 / t_image},
                                       {"rank_file_mb_s", image.size / 1e6 / w.write_seconds},
                                       {"sha256_mb_s", image.size / 1e6 / w.hash_seconds},
                                       {"read_mb_s", bytes / 1e6 / t_read},
                                       {"sha", w.sha256.substr(0, 8)}}
                            .dump()
                            .c_str());
    std::filesystem::remove(h5);
  }
  return 0;
}
