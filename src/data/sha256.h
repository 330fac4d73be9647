// SHA-256 (OpenSSL EVP) as lowercase hex: shard checksums in the manifest, the tokenizer
// hash that ties shards to a run, and the prep's source hash.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX; keeps <openssl/evp.h> out of this header

namespace vchat::data {

// Incremental hash: update() any number of times, then final_hex() once.
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  void update(std::string_view s) { update(s.data(), s.size()); }
  // The digest of everything passed to update(); the object cannot be updated afterwards.
  std::string final_hex();

 private:
  struct Free {
    void operator()(evp_md_ctx_st* c) const;
  };
  std::unique_ptr<evp_md_ctx_st, Free> ctx_;
  bool finished_ = false;
};

std::string sha256_hex(const void* data, size_t n);
std::string sha256_hex(std::string_view bytes);
// Streams the file in blocks. Throws DataError naming the file if it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace vchat::data
