#include "checkpoint/rank_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "data/sample.h"
#include "data/sha256.h"
#include "data/shard.h"

namespace vchat::ckpt {

namespace h5 = data::h5;
using h5::fail;
using h5::fail_h5;

namespace {

const char* kFormat = "vchat-checkpoint-rank";

void write_i64_array_attr(hid_t obj, const char* name, const std::vector<int64_t>& v, const std::string& path) {
  const hsize_t n = v.size();
  h5::Dataspace space(n ? H5Screate_simple(1, &n, nullptr) : H5Screate(H5S_NULL));
  h5::Attribute a(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  if (!a || (n && H5Awrite(a.get(), H5T_NATIVE_INT64, v.data()) < 0))
    fail_h5(path, std::string("writing attribute '") + name + "' failed");
}

std::vector<int64_t> read_i64_array_attr(hid_t obj, const char* name, const std::string& where) {
  if (H5Aexists(obj, name) <= 0) fail(where, std::string("missing attribute '") + name + "'");
  h5::Attribute a(H5Aopen(obj, name, H5P_DEFAULT));
  h5::Dataspace space(a ? H5Aget_space(a.get()) : H5I_INVALID_HID);
  if (!space) fail_h5(where, std::string("cannot open attribute '") + name + "'");
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  std::vector<int64_t> v(n > 0 ? n : 0);
  if (n > 0 && H5Aread(a.get(), H5T_NATIVE_INT64, v.data()) < 0)
    fail_h5(where, std::string("reading attribute '") + name + "' failed");
  return v;
}

}  // namespace

std::string PieceRef::dataset() const { return std::string("/") + state_kind_name(kind) + "/" + param; }

StateKind parse_state_kind(const std::string& s, const std::string& origin) {
  for (StateKind k : {StateKind::value, StateKind::adam_m, StateKind::adam_v})
    if (s == state_kind_name(k)) return k;
  throw data::DataError(origin + ": unknown state kind '" + s + "' (value, adam_m, adam_v)");
}

nlohmann::json to_json(const PieceRef& p) {
  return {{"param", p.param}, {"kind", state_kind_name(p.kind)}, {"full", p.shard.full}, {"dim", p.shard.dim},
          {"index", p.shard.index}, {"count", p.shard.count}, {"begin", p.begin}, {"end", p.end}};
}

PieceRef piece_from_json(const nlohmann::json& j, const std::string& origin) {
  try {
    PieceRef p;
    p.param = j.at("param").get<std::string>();
    p.kind = parse_state_kind(j.at("kind").get<std::string>(), origin);
    p.shard = {j.at("dim").get<int>(), j.at("index").get<int64_t>(), j.at("count").get<int64_t>(),
               j.at("full").get<Shape>()};
    p.begin = j.at("begin").get<int64_t>();
    p.end = j.at("end").get<int64_t>();
    int64_t local = 1;
    for (int64_t d : p.shard.local()) local *= d;
    if (p.shard.full.empty() || p.shard.full.size() > 2 || p.shard.dim >= static_cast<int>(p.shard.full.size()) ||
        p.shard.count < 1 || p.shard.index < 0 || p.shard.index >= p.shard.count ||
        (p.shard.dim >= 0 && p.shard.full[p.shard.dim] % p.shard.count != 0) || p.begin < 0 || p.end < p.begin ||
        p.end > local)
      throw data::DataError(origin + ": piece " + p.dataset() + " has an impossible slice or range");
    return p;
  } catch (const nlohmann::json::exception& e) {
    throw data::DataError(origin + ": malformed piece entry (" + e.what() + ")");
  }
}

void ImageBuffer::Free::operator()(char* p) const { std::free(p); }

void ImageBuffer::reserve(size_t n, bool keep) {
  if (n <= cap_) return;
  const size_t size = (n + 4095) / 4096 * 4096;  // O_DIRECT writes whole blocks
  void* mem = nullptr;
  if (posix_memalign(&mem, 4096, size) != 0) throw std::bad_alloc();
  if (keep && cap_) std::memcpy(mem, p_.get(), cap_);
  p_.reset(static_cast<char*>(mem));
  cap_ = size;
}

namespace {

// HDF5's core driver allocates its file image through these: all of it lands in one
// ImageBuffer (growing it only when the estimate was short), and nothing is freed.
void* image_malloc(size_t size, H5FD_file_image_op_t, void* udata) {
  auto* b = static_cast<ImageBuffer*>(udata);
  b->reserve(size, false);
  return b->data();
}
void* image_memcpy(void* dest, const void* src, size_t size, H5FD_file_image_op_t, void*) {
  return std::memcpy(dest, src, size);
}
void* image_realloc(void* ptr, size_t size, H5FD_file_image_op_t, void* udata) {
  auto* b = static_cast<ImageBuffer*>(udata);
  if (ptr && ptr != b->data()) return nullptr;  // not ours: cannot happen
  b->reserve(size, ptr != nullptr);           // a new file starts from nullptr
  return b->data();
}
herr_t image_free(void*, H5FD_file_image_op_t, void*) { return 0; }
void* udata_copy(void* udata) { return udata; }
herr_t udata_free(void*) { return 0; }

}  // namespace

RankImage build_rank_image(const std::vector<PieceRef>& pieces, const std::vector<const float*>& data, int64_t step,
                           int rank, const nlohmann::json& meta, ImageBuffer& buf) {
  const std::string where = "checkpoint image of rank " + std::to_string(rank);
  h5::ErrorSilencer quiet;
  size_t estimate = (size_t(1) << 20) + meta.dump().size();
  for (const PieceRef& p : pieces) estimate += static_cast<size_t>(p.size()) * 4 + 4096;
  buf.reserve(estimate, false);
  h5::PropList fapl(H5Pcreate(H5P_FILE_ACCESS));
  H5FD_file_image_callbacks_t cb = {image_malloc, image_memcpy, image_realloc, image_free, udata_copy, udata_free, &buf};
  // In memory only (no backing store), grown 64 MiB at a time, inside `buf`.
  if (!fapl || H5Pset_fapl_core(fapl.get(), size_t(64) << 20, false) < 0 ||
      H5Pset_file_image_callbacks(fapl.get(), &cb) < 0)
    fail_h5(where, "cannot set up HDF5's in-memory file driver");
  h5::File f(H5Fcreate(("vchat-rank-" + std::to_string(rank) + ".h5").c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl.get()));
  if (!f) fail_h5(where, "cannot create the in-memory file");
  h5::write_str_attr(f.get(), "format", kFormat, where);
  h5::write_int_attr(f.get(), "format_version", H5T_STD_I32LE, kFormatVersion, where);
  h5::write_int_attr(f.get(), "step", H5T_STD_I64LE, step, where);
  h5::write_int_attr(f.get(), "rank", H5T_STD_I32LE, rank, where);
  h5::write_str_attr(f.get(), "meta", meta.dump(), where);
  for (const char* g : {"value", "adam_m", "adam_v"}) {
    h5::Group grp(H5Gcreate2(f.get(), g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    if (!grp) fail_h5(where, std::string("cannot create group '") + g + "'");
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    const PieceRef& p = pieces[i];
    const std::string name = p.dataset();
    const hsize_t n = static_cast<hsize_t>(p.size());
    h5::Dataspace space(H5Screate_simple(1, &n, nullptr));
    h5::Dataset ds(H5Dcreate2(f.get(), name.c_str(), H5T_IEEE_F32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    if (!ds) fail_h5(where, "cannot create dataset '" + name + "'");
    if (n && H5Dwrite(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data[i]) < 0)
      fail_h5(where, "writing dataset '" + name + "' failed (out of memory?)");
    write_i64_array_attr(ds.get(), "full_shape", p.shard.full, where);
    write_i64_array_attr(ds.get(), "shard", {p.shard.dim, p.shard.index, p.shard.count}, where);
    write_i64_array_attr(ds.get(), "range", {p.begin, p.end}, where);
  }
  if (H5Fflush(f.get(), H5F_SCOPE_GLOBAL) < 0) fail_h5(where, "flushing the in-memory file failed");
  const ssize_t size = H5Fget_file_image(f.get(), nullptr, 0);
  if (size <= 0) fail_h5(where, "cannot size the in-memory file");
  if (H5Fclose(f.release()) < 0) fail_h5(where, "closing the in-memory file failed");
  RankImage img;
  img.bytes = buf.data();  // the driver's image: `buf` (its callbacks never free it)
  img.size = static_cast<size_t>(size);
  return img;
}

WriteStats write_rank_image(const std::string& path, const RankImage& image) {
  using clock = std::chrono::steady_clock;
  auto secs = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
  WriteStats st;
  data::Sha256 sha;
  bool direct = true;
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_DIRECT, 0644);
  if (fd < 0 && errno == EINVAL) {  // tmpfs and others refuse O_DIRECT: buffered then
    direct = false;
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  }
  if (fd < 0) fail(path, std::string("cannot create: ") + std::strerror(errno));
  auto fail_write = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    fail(path, std::string(what) + ": " + std::strerror(err) + (err == ENOSPC || err == EFBIG ? " (disk full?)" : ""));
  };
  const size_t chunk = size_t(16) << 20;  // a multiple of every block size
  const char* p = image.bytes;
  for (size_t done = 0; done < image.size;) {
    size_t n = std::min(chunk, image.size - done);
    const bool tail = direct && n % 4096 != 0;  // the last, partial block: written buffered
    if (tail && n > 4096) n -= n % 4096;
    if (tail && n < 4096) {
      if (::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_DIRECT) != 0) fail_write("clearing O_DIRECT failed");
      direct = false;
    }
    auto t0 = clock::now();
    sha.update(p + done, n);
    st.hash_seconds += secs(t0);
    t0 = clock::now();
    for (size_t off = 0; off < n;) {
      const ssize_t w = ::write(fd, p + done + off, n - off);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail_write("write failed");
      }
      off += static_cast<size_t>(w);
    }
    st.write_seconds += secs(t0);
    done += n;
  }
  const auto t0 = clock::now();
  if (::fsync(fd) != 0) fail_write("fsync failed");
  if (::close(fd) != 0) fail(path, std::string("close failed: ") + std::strerror(errno));
  st.write_seconds += secs(t0);
  st.sha256 = sha.final_hex();
  return st;
}

RankFileReader::RankFileReader(const std::string& path) : path_(path) {
  h5::ErrorSilencer quiet;
  file_ = h5::open_read_only(path, "checkpoint rank file");
  if (h5::read_str_attr(file_.get(), "format", path) != kFormat) fail(path, "not a vchat checkpoint rank file");
  const int64_t v = h5::read_int_attr(file_.get(), "format_version", path);
  if (v != kFormatVersion)
    fail(path, "checkpoint format version " + std::to_string(v) + ", this build reads " + std::to_string(kFormatVersion));
}

nlohmann::json RankFileReader::meta() const {
  h5::ErrorSilencer quiet;
  try {
    return nlohmann::json::parse(h5::read_str_attr(file_.get(), "meta", path_));
  } catch (const nlohmann::json::exception& e) {
    fail(path_, std::string("attribute 'meta' is not JSON: ") + e.what());
  }
}

void RankFileReader::read(const PieceRef& p, int64_t lo, int64_t hi, float* dst) const {
  h5::ErrorSilencer quiet;
  const std::string name = p.dataset();
  if (H5Lexists(file_.get(), state_kind_name(p.kind), H5P_DEFAULT) <= 0 || H5Lexists(file_.get(), name.c_str(), H5P_DEFAULT) <= 0)
    fail(path_, "has no tensor '" + name + "' (the manifest lists it)");
  h5::Dataset ds(H5Dopen2(file_.get(), name.c_str(), H5P_DEFAULT));
  h5::Dataspace space(ds ? H5Dget_space(ds.get()) : H5I_INVALID_HID);
  if (!space) fail_h5(path_, "cannot open tensor '" + name + "'");
  if (H5Sget_simple_extent_npoints(space.get()) != p.size())
    fail(path_, "tensor '" + name + "' holds " + std::to_string(H5Sget_simple_extent_npoints(space.get())) +
                    " values, the manifest says " + std::to_string(p.size()));
  if (lo < p.begin || hi > p.end || lo >= hi) throw std::logic_error("RankFileReader::read outside the piece " + name);
  const hsize_t start = static_cast<hsize_t>(lo - p.begin), count = static_cast<hsize_t>(hi - lo);
  h5::Dataspace mem(H5Screate_simple(1, &count, nullptr));
  if (H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr) < 0 ||
      H5Dread(ds.get(), H5T_NATIVE_FLOAT, mem.get(), space.get(), H5P_DEFAULT, dst) < 0)
    fail_h5(path_, "reading tensor '" + name + "' failed (corrupt or truncated file?)");
}

std::vector<PieceRef> RankFileReader::pieces() const {
  h5::ErrorSilencer quiet;
  std::vector<PieceRef> out;
  for (StateKind k : {StateKind::value, StateKind::adam_m, StateKind::adam_v}) {
    h5::Group g(H5Gopen2(file_.get(), state_kind_name(k), H5P_DEFAULT));
    if (!g) fail_h5(path_, std::string("missing group '") + state_kind_name(k) + "'");
    H5G_info_t info;
    if (H5Gget_info(g.get(), &info) < 0) fail_h5(path_, "cannot list tensors");
    for (hsize_t i = 0; i < info.nlinks; ++i) {
      const ssize_t len = H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
      if (len < 0) fail_h5(path_, "cannot list tensors");
      std::string name(static_cast<size_t>(len) + 1, '\0');
      H5Lget_name_by_idx(g.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT);
      name.resize(static_cast<size_t>(len));
      PieceRef p;
      p.param = name;
      p.kind = k;
      const std::string where = path_ + ": tensor '" + p.dataset() + "'";
      h5::Dataset ds(H5Dopen2(g.get(), name.c_str(), H5P_DEFAULT));
      if (!ds) fail_h5(path_, "cannot open tensor '" + p.dataset() + "'");
      const std::vector<int64_t> shard = read_i64_array_attr(ds.get(), "shard", where);
      const std::vector<int64_t> range = read_i64_array_attr(ds.get(), "range", where);
      if (shard.size() != 3 || range.size() != 2) fail(where, "attributes 'shard' or 'range' have the wrong length");
      p.shard = {static_cast<int>(shard[0]), shard[1], shard[2], read_i64_array_attr(ds.get(), "full_shape", where)};
      p.begin = range[0];
      p.end = range[1];
      h5::Dataspace space(H5Dget_space(ds.get()));
      if (!space || H5Sget_simple_extent_npoints(space.get()) != p.size())
        fail(where, "holds another number of values than its range says");
      out.push_back(piece_from_json(to_json(p), where));  // the same checks as a manifest entry
    }
  }
  return out;
}

}  // namespace vchat::ckpt
