#include "data/sha256.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "data/sample.h"

namespace vchat::data {

void Sha256::Free::operator()(evp_md_ctx_st* c) const { EVP_MD_CTX_free(c); }

Sha256::Sha256() : ctx_(EVP_MD_CTX_new()) {
  if (!ctx_ || EVP_DigestInit_ex(ctx_.get(), EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("Sha256: OpenSSL could not initialise SHA-256");
}

void Sha256::update(const void* data, size_t n) {
  if (finished_) throw std::logic_error("Sha256::update after final_hex");
  if (n > 0 && EVP_DigestUpdate(ctx_.get(), data, n) != 1) throw std::runtime_error("Sha256: EVP_DigestUpdate failed");
}

std::string Sha256::final_hex() {
  if (finished_) throw std::logic_error("Sha256::final_hex called twice");
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx_.get(), md, &len) != 1) throw std::runtime_error("Sha256: EVP_DigestFinal_ex failed");
  finished_ = true;
  static const char* hex = "0123456789abcdef";
  std::string out(2 * len, '0');
  for (unsigned i = 0; i < len; ++i) {
    out[2 * i] = hex[md[i] >> 4];
    out[2 * i + 1] = hex[md[i] & 15];
  }
  return out;
}

std::string sha256_hex(const void* data, size_t n) {
  Sha256 h;
  h.update(data, n);
  return h.final_hex();
}

std::string sha256_hex(std::string_view bytes) { return sha256_hex(bytes.data(), bytes.size()); }

std::string sha256_file(const std::string& path) {
  // POSIX read rather than iostreams: we want errno in the message, and 1 MiB blocks.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw DataError(path + ": cannot open for hashing: " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  Sha256 h;
  std::vector<char> buf(1 << 20);
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      throw DataError(path + ": read error while hashing: " + std::strerror(errno));
    }
    h.update(buf.data(), static_cast<size_t>(n));
  }
  return h.final_hex();
}

}  // namespace vchat::data
