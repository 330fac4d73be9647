// `vchat-prep inspect` and `vchat-prep verify` over a prepared dataset directory.
#pragma once
#include <ostream>
#include <string>

namespace vchat::prep {

struct InspectOptions {
  std::string dir;
  int64_t sample = 0;
  std::string tokenizer;   // default: the one recorded in the manifest
  std::string dump_image;  // directory for the sample's images as PNG ("" = none)
};
// Summary of the dataset plus one sample rendered back to text (supervised spans [[ ]]).
void inspect(const InspectOptions& opt, std::ostream& out);

// Re-reads every shard: checksums against the manifest, offsets, attributes, sentinel and
// image counts, and the manifest's totals. Returns the number of problems (printed).
int verify(const std::string& dir, std::ostream& out);

}  // namespace vchat::prep
