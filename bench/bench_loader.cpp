// Loader throughput: samples/s one rank gets out of DataLoader::next_step() (HDF5 reads on
// the prefetch thread + collation) from a prepared dataset, against how fast the consumer
// takes them. Run it twice over the same data to measure page-cached reads.
//   vchat-bench-loader --data DIR --tokens-per-image 257 --image-size 224 --seq-len 2048
//                      --micro-batch 8 --steps 20
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>

#include "data/loader.h"

using namespace vchat;
namespace po = boost::program_options;

int main(int argc, char** argv) {
  std::string dir;
  int64_t tpi = 257, size = 224, seq = 2048, micro = 8, steps = 20;
  po::options_description o("vchat-bench-loader");
  o.add_options()("data", po::value(&dir)->required())("tokens-per-image", po::value(&tpi))("image-size", po::value(&size))(
      "seq-len", po::value(&seq))("micro-batch", po::value(&micro))("steps", po::value(&steps));
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, o), vm);
    po::notify(vm);
  } catch (const std::exception& e) {
    std::cerr << "vchat-bench-loader: " << e.what() << "\n" << o;
    return 2;
  }
  data::LoaderConfig c;
  c.sources = {{"bench", dir, 1.0}};
  c.micro_batch = micro;
  c.global_batch = micro * 4;
  c.collate = {tpi, size, seq, false};
  data::DataLoader loader(c);
  loader.next_step();  // start-up (opening shards, first reads) is not throughput
  const auto t0 = std::chrono::steady_clock::now();
  int64_t samples = 0, images = 0;
  for (int64_t s = 0; s < steps; ++s)
    for (const Batch& b : loader.next_step().micro) {
      samples += b.batch_size();
      images += b.n_images();
    }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("loader samples/s=%.1f images/s=%.1f image_size=%lld samples=%lld\n", samples / secs, images / secs,
              static_cast<long long>(size), static_cast<long long>(samples));
  return 0;
}
