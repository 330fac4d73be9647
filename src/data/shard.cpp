#include "data/shard.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "check.h"
#include "data/sha256.h"

namespace vchat::data {

namespace fs = std::filesystem;

using h5::fail;
using h5::fail_h5;
using h5::read_int_attr;
using h5::read_str_attr;
using h5::write_int_attr;
using h5::write_str_attr;

namespace {

// Tokens and mask: 16K elements per chunk (64 KiB of int32). The loader reads samples in
// shuffled order, so each sample costs whole chunks: small enough to keep that read
// amplification low, large enough that HDF5's per-chunk index stays small.
constexpr hsize_t kTokenChunk = 16384;
// Buffered tokens are written in whole chunks, 16 at a time (chunk-aligned, no re-reads).
constexpr size_t kTokenFlush = 16 * kTokenChunk;
// Images are buffered up to this many bytes; each image is one chunk, so any write aligns.
constexpr size_t kImageFlushBytes = size_t(16) << 20;
// verify_shard reads the big datasets in blocks of this many bytes.
constexpr size_t kVerifyBlockBytes = size_t(16) << 20;
// verify_shard reports at most this many problems of one kind, then a count of the rest.
constexpr int kMaxProblemsPerKind = 10;

std::string str(int64_t v) { return std::to_string(v); }

// ---- writing ---------------------------------------------------------------------------

// An empty dataset, extendible along dim 0, chunked as `chunk` (chunk[1:] = row shape).
h5::Dataset create_extendible(hid_t file, const char* name, hid_t file_type, const std::vector<hsize_t>& chunk,
                              const std::string& path) {
  const int rank = static_cast<int>(chunk.size());
  std::vector<hsize_t> dims = chunk, maxdims = chunk;
  dims[0] = 0;
  maxdims[0] = H5S_UNLIMITED;
  h5::Dataspace space(H5Screate_simple(rank, dims.data(), maxdims.data()));
  h5::PropList dcpl(H5Pcreate(H5P_DATASET_CREATE));
  if (!space || !dcpl || H5Pset_chunk(dcpl.get(), rank, chunk.data()) < 0 ||
      // Every element inside the extent gets written by us; don't pre-fill chunks.
      H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER) < 0)
    fail_h5(path, std::string("cannot set up dataset '") + name + "'");
  h5::Dataset ds(H5Dcreate2(file, name, file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT));
  if (!ds) fail_h5(path, std::string("cannot create dataset '") + name + "'");
  return ds;
}

// Grows ds along dim 0 to row0 + nrows and writes rows [row0, row0 + nrows) from buf.
void append_rows(hid_t ds, hid_t mem_type, int64_t row0, int64_t nrows, const std::vector<hsize_t>& row_shape,
                 const void* buf, const std::string& path, const char* name) {
  if (nrows == 0) return;
  std::vector<hsize_t> start(1 + row_shape.size(), 0), count{static_cast<hsize_t>(nrows)};
  count.insert(count.end(), row_shape.begin(), row_shape.end());
  start[0] = static_cast<hsize_t>(row0);
  std::vector<hsize_t> extent = count;
  extent[0] = static_cast<hsize_t>(row0 + nrows);
  const int rank = static_cast<int>(count.size());
  if (H5Dset_extent(ds, extent.data()) < 0) fail_h5(path, std::string("cannot extend dataset '") + name + "'");
  h5::Dataspace fspace(H5Dget_space(ds));
  h5::Dataspace mspace(H5Screate_simple(rank, count.data(), nullptr));
  if (!fspace || !mspace ||
      H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr) < 0 ||
      H5Dwrite(ds, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, buf) < 0)
    fail_h5(path, std::string("writing dataset '") + name + "' failed (disk full?)");
}

void write_array(hid_t file, const char* name, const std::vector<int64_t>& v, const std::string& path) {
  const hsize_t n = v.size();
  h5::Dataspace space(H5Screate_simple(1, &n, nullptr));
  h5::Dataset ds(H5Dcreate2(file, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
  if (!ds || H5Dwrite(ds.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0)
    fail_h5(path, std::string("writing dataset '") + name + "' failed");
}

// ---- reading ---------------------------------------------------------------------------

// Opens an integer-typed dataset of the given rank and returns its dims.
h5::Dataset open_int_dataset(hid_t file, const char* name, int rank, const std::string& path, std::vector<int64_t>& dims) {
  const htri_t e = H5Lexists(file, name, H5P_DEFAULT);
  if (e < 0) fail_h5(path, std::string("cannot look up dataset '") + name + "'");
  if (e == 0) fail(path, std::string("missing dataset '") + name + "' (not a vchat file of this kind?)");
  h5::Dataset ds(H5Dopen2(file, name, H5P_DEFAULT));
  if (!ds) fail_h5(path, std::string("cannot open dataset '") + name + "'");
  h5::Datatype type(H5Dget_type(ds.get()));
  if (!type || H5Tget_class(type.get()) != H5T_INTEGER) fail(path, std::string("dataset '") + name + "' is not integer-typed");
  h5::Dataspace space(H5Dget_space(ds.get()));
  const int r = space ? H5Sget_simple_extent_ndims(space.get()) : -1;
  if (r != rank) fail(path, std::string("dataset '") + name + "' has rank " + str(r) + ", expected " + str(rank));
  std::vector<hsize_t> d(rank);
  H5Sget_simple_extent_dims(space.get(), d.data(), nullptr);
  dims.assign(d.begin(), d.end());
  return ds;
}

// Reads rows [row0, row0 + nrows) along dim 0 into buf (row_shape = the other dims).
void read_rows(hid_t ds, hid_t mem_type, int64_t row0, int64_t nrows, const std::vector<hsize_t>& row_shape, void* buf,
               const std::string& path, const char* name) {
  if (nrows == 0) return;
  std::vector<hsize_t> start(1 + row_shape.size(), 0), count{static_cast<hsize_t>(nrows)};
  count.insert(count.end(), row_shape.begin(), row_shape.end());
  start[0] = static_cast<hsize_t>(row0);
  h5::Dataspace fspace(H5Dget_space(ds));
  h5::Dataspace mspace(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr));
  if (!fspace || !mspace ||
      H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr) < 0 ||
      H5Dread(ds, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, buf) < 0)
    fail_h5(path, std::string("reading dataset '") + name + "' rows " + str(row0) + ".." + str(row0 + nrows) +
                      " failed (corrupt or truncated file)");
}

std::vector<int64_t> read_all_int64(hid_t ds, int64_t n, const std::string& path, const char* name) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  read_rows(ds, H5T_NATIVE_INT64, 0, n, {}, v.data(), path, name);
  return v;
}

// Runs f; with a problem list, a DataError becomes a problem instead of propagating.
// Returns whether f succeeded.
template <class F>
bool attempt(std::vector<std::string>* problems, F&& f) {
  if (!problems) {
    f();
    return true;
  }
  try {
    f();
    return true;
  } catch (const DataError& e) {
    problems->push_back(e.what());
    return false;
  }
}

// Reads the six root attributes. Without a problem list throws at the first bad one;
// with one, records every bad one. format_version is checked against this build.
ShardAttrs read_attrs(hid_t file, const std::string& path, std::vector<std::string>* problems) {
  ShardAttrs a;
  attempt(problems, [&] {
    const int64_t v = read_int_attr(file, "format_version", path);
    a.format_version = static_cast<int>(v);
    if (v != kShardFormatVersion) fail(path, "format_version " + str(v) + ", this build reads " + str(kShardFormatVersion));
  });
  attempt(problems, [&] { a.tokenizer_sha256 = read_str_attr(file, "tokenizer_sha256", path); });
  attempt(problems, [&] {
    a.image_size = read_int_attr(file, "image_size", path);
    if (a.image_size < 1) fail(path, "image_size " + str(a.image_size) + " (must be >= 1)");
  });
  attempt(problems, [&] { a.image_mode = read_str_attr(file, "image_mode", path); });
  attempt(problems, [&] { a.dataset = read_str_attr(file, "dataset", path); });
  attempt(problems, [&] { a.source_hash = read_str_attr(file, "source_hash", path); });
  return a;
}

// Offsets must start at 0, never decrease and end at `end` (T or M).
void check_offsets(const std::vector<int64_t>& off, int64_t end, const std::string& name, const std::string& end_name,
                   const std::string& path, std::vector<std::string>& problems) {
  if (off.empty()) {
    problems.push_back(path + ": " + name + " is empty (it needs N+1 entries)");
    return;
  }
  if (off[0] != 0) problems.push_back(path + ": " + name + "[0] = " + str(off[0]) + ", must be 0");
  int64_t bad = 0;
  for (size_t i = 1; i < off.size(); ++i) {
    if (off[i] >= off[i - 1]) continue;
    if (bad++ < kMaxProblemsPerKind)
      problems.push_back(path + ": " + name + "[" + str(i) + "] = " + str(off[i]) + " < " + name + "[" + str(i - 1) +
                         "] = " + str(off[i - 1]) + " (offsets must be non-decreasing)");
  }
  if (bad > kMaxProblemsPerKind)
    problems.push_back(path + ": ... and " + str(bad - kMaxProblemsPerKind) + " more decreasing " + name);
  if (off.back() != end)
    problems.push_back(path + ": " + name + " ends at " + str(off.back()) + ", but " + end_name + " has " + str(end) +
                       (end_name == "images" ? " images" : " elements"));
}

// Shape agreement between the datasets (dims as opened). Appends problems.
void check_shapes(const std::vector<int64_t>& tok, const std::vector<int64_t>& mask, const std::vector<int64_t>& img,
                  const std::vector<int64_t>& soff, const std::vector<int64_t>& ioff, int64_t image_size,
                  const std::string& path, std::vector<std::string>& problems) {
  if (!tok.empty() && !mask.empty() && tok[0] != mask[0])
    problems.push_back(path + ": loss_mask has " + str(mask[0]) + " elements, tokens " + str(tok[0]));
  if (img.size() == 4 && (img[1] != image_size || img[2] != image_size || img[3] != 3))
    problems.push_back(path + ": images are [" + str(img[0]) + ", " + str(img[1]) + ", " + str(img[2]) + ", " +
                       str(img[3]) + "], expected [M, " + str(image_size) + ", " + str(image_size) + ", 3]");
  if (!soff.empty() && !ioff.empty() && soff[0] != ioff[0])
    problems.push_back(path + ": sample_offsets has " + str(soff[0]) + " entries, image_offsets " + str(ioff[0]) +
                       " (both must be N+1)");
}

std::string basename_of(const std::string& path) { return fs::path(path).filename().string(); }

std::string parent_dir_of(const std::string& path) {
  const fs::path p = fs::path(path).parent_path();
  return p.empty() ? std::string(".") : p.string();
}

}  // namespace

void fsync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw DataError(path + ": cannot open to fsync: " + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems refuse fsync on a directory (EINVAL): nothing more we can do there.
  if (rc != 0 && err != EINVAL && err != EROFS) throw DataError(path + ": fsync failed: " + std::strerror(err));
}

// ---- ShardWriter -----------------------------------------------------------------------

ShardWriter::ShardWriter(std::string final_path, ShardAttrs attrs, bool overwrite)
    : final_path_(std::move(final_path)), tmp_path_(final_path_ + ".tmp"), attrs_(std::move(attrs)), overwrite_(overwrite) {
  VCHAT_CHECK(attrs_.format_version == kShardFormatVersion,
              final_path_ << ": this build writes format_version " << kShardFormatVersion);
  VCHAT_CHECK(attrs_.image_size >= 1, final_path_ << ": image_size " << attrs_.image_size);
  VCHAT_CHECK(attrs_.image_mode == "pad" || attrs_.image_mode == "crop",
              final_path_ << ": image_mode '" << attrs_.image_mode << "' (pad or crop)");
  std::error_code ec;
  if (!overwrite_ && fs::exists(final_path_, ec))
    throw DataError(final_path_ + ": already exists; refusing to overwrite it (remove it or ask for overwrite)");

  h5::ErrorSilencer quiet;
  // STRONG close: H5Fclose really closes (and flushes) the file even if a handle leaked,
  // so the bytes we fsync and hash in finish() are the final ones.
  h5::PropList fapl(H5Pcreate(H5P_FILE_ACCESS));
  if (!fapl || H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG) < 0)
    fail_h5(tmp_path_, "cannot create a file access property list");
  file_ = h5::File(H5Fcreate(tmp_path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()));
  if (!file_) fail_h5(tmp_path_, "cannot create the shard file");
  try {
    const hsize_t S = static_cast<hsize_t>(attrs_.image_size);
    tokens_ds_ = create_extendible(file_.get(), "tokens", H5T_STD_I32LE, {kTokenChunk}, tmp_path_);
    mask_ds_ = create_extendible(file_.get(), "loss_mask", H5T_STD_U8LE, {kTokenChunk}, tmp_path_);
    // One image per chunk: reading a sample's images touches exactly its own chunks.
    images_ds_ = create_extendible(file_.get(), "images", H5T_STD_U8LE, {1, S, S, 3}, tmp_path_);
  } catch (...) {
    discard();  // the destructor does not run for a throwing constructor
    throw;
  }
}

ShardWriter::~ShardWriter() {
  if (!finished_) discard();
}

void ShardWriter::discard() noexcept {
  h5::ErrorSilencer quiet;
  tokens_ds_.reset();
  mask_ds_.reset();
  images_ds_.reset();
  file_.reset();
  std::error_code ec;
  fs::remove(tmp_path_, ec);  // best effort: nothing to report from a destructor
}

void ShardWriter::add(const Sample& s) {
  if (finished_) throw std::logic_error(final_path_ + ": ShardWriter::add after finish()");
  if (failed_) throw DataError(final_path_ + ": an earlier write failed; this shard cannot be completed");
  const std::string where = final_path_ + ": sample " + str(samples()) + " of this shard: ";
  if (s.tokens.size() != s.loss_mask.size())
    throw DataError(where + str(s.tokens.size()) + " tokens but " + str(s.loss_mask.size()) + " loss_mask entries");
  if (s.n_images < 0 || s.n_images > kMaxImagesPerSample)
    throw DataError(where + str(s.n_images) + " images (at most " + str(kMaxImagesPerSample) + " per sample)");
  const int64_t image_bytes = attrs_.image_size * attrs_.image_size * 3;
  if (static_cast<int64_t>(s.pixels.size()) != s.n_images * image_bytes)
    throw DataError(where + "pixels hold " + str(s.pixels.size()) + " bytes, " + str(s.n_images) + " images of " +
                    str(attrs_.image_size) + "x" + str(attrs_.image_size) + "x3 need " + str(s.n_images * image_bytes));
  const int64_t sentinels = std::count(s.tokens.begin(), s.tokens.end(), kImageSentinel);
  if (sentinels != s.n_images)
    throw DataError(where + str(sentinels) + " image sentinels (" + str(kImageSentinel) + ") but " + str(s.n_images) +
                    " images");
  for (size_t j = 0; j < s.loss_mask.size(); ++j)
    if (s.loss_mask[j] > 1) throw DataError(where + "loss_mask[" + str(j) + "] = " + str(s.loss_mask[j]) + " (must be 0 or 1)");

  try {
    tokens_buf_.insert(tokens_buf_.end(), s.tokens.begin(), s.tokens.end());
    mask_buf_.insert(mask_buf_.end(), s.loss_mask.begin(), s.loss_mask.end());
    images_buf_.insert(images_buf_.end(), s.pixels.begin(), s.pixels.end());
    sample_offsets_.push_back(sample_offsets_.back() + static_cast<int64_t>(s.tokens.size()));
    image_offsets_.push_back(image_offsets_.back() + s.n_images);
    h5::ErrorSilencer quiet;
    if (tokens_buf_.size() >= kTokenFlush) flush_tokens(false);
    if (images_buf_.size() >= kImageFlushBytes) flush_images();
  } catch (...) {
    failed_ = true;  // buffers and file may disagree now: only discarding is safe
    throw;
  }
}

void ShardWriter::flush_tokens(bool all) {
  // Except at the end, write whole chunks only, so every chunk is written exactly once.
  const size_t n = all ? tokens_buf_.size() : tokens_buf_.size() / kTokenChunk * kTokenChunk;
  append_rows(tokens_ds_.get(), H5T_NATIVE_INT32, tokens_written_, n, {}, tokens_buf_.data(), tmp_path_, "tokens");
  append_rows(mask_ds_.get(), H5T_NATIVE_UINT8, tokens_written_, n, {}, mask_buf_.data(), tmp_path_, "loss_mask");
  tokens_written_ += n;
  tokens_buf_.erase(tokens_buf_.begin(), tokens_buf_.begin() + n);
  mask_buf_.erase(mask_buf_.begin(), mask_buf_.begin() + n);
}

void ShardWriter::flush_images() {
  const hsize_t S = static_cast<hsize_t>(attrs_.image_size);
  const int64_t n = static_cast<int64_t>(images_buf_.size() / (S * S * 3));
  append_rows(images_ds_.get(), H5T_NATIVE_UINT8, images_written_, n, {S, S, 3}, images_buf_.data(), tmp_path_, "images");
  images_written_ += n;
  images_buf_.clear();
}

ShardSummary ShardWriter::finish() {
  if (finished_) throw std::logic_error(final_path_ + ": ShardWriter::finish called twice");
  if (failed_) throw DataError(final_path_ + ": an earlier write failed; this shard cannot be completed");
  h5::ErrorSilencer quiet;
  ShardSummary sum;
  try {
    flush_tokens(true);
    flush_images();
    const hid_t f = file_.get();
    write_array(f, "sample_offsets", sample_offsets_, tmp_path_);
    write_array(f, "image_offsets", image_offsets_, tmp_path_);
    write_int_attr(f, "format_version", H5T_STD_I32LE, attrs_.format_version, tmp_path_);
    write_str_attr(f, "tokenizer_sha256", attrs_.tokenizer_sha256, tmp_path_);
    write_int_attr(f, "image_size", H5T_STD_I64LE, attrs_.image_size, tmp_path_);
    write_str_attr(f, "image_mode", attrs_.image_mode, tmp_path_);
    write_str_attr(f, "dataset", attrs_.dataset, tmp_path_);
    write_str_attr(f, "source_hash", attrs_.source_hash, tmp_path_);
    tokens_ds_.reset();
    mask_ds_.reset();
    images_ds_.reset();
    // Closing flushes HDF5's metadata: its failure (disk full) must not go unnoticed.
    if (H5Fclose(file_.release()) < 0) fail_h5(tmp_path_, "closing the shard failed (disk full?)");
    fsync_path(tmp_path_);

    sum.file = basename_of(final_path_);
    sum.samples = samples();
    sum.tokens = sample_offsets_.back();
    sum.images = image_offsets_.back();
    sum.sha256 = sha256_file(tmp_path_);

    std::error_code ec;
    if (!overwrite_ && fs::exists(final_path_, ec))
      throw DataError(final_path_ + ": appeared while the shard was being written; refusing to overwrite it");
    fs::rename(tmp_path_, final_path_, ec);  // atomic within one file system
    if (ec) throw DataError(tmp_path_ + ": cannot rename to " + final_path_ + ": " + ec.message());
    finished_ = true;
    fsync_path(parent_dir_of(final_path_));  // make the rename itself durable
  } catch (...) {
    failed_ = true;  // the destructor removes the .tmp (if it was not renamed yet)
    throw;
  }
  return sum;
}

// ---- ShardReader -----------------------------------------------------------------------

ShardReader::ShardReader(std::string path, const ShardExpect& expect) : path_(std::move(path)) {
  h5::ErrorSilencer quiet;
  file_ = h5::open_read_only(path_, "shard file");
  const hid_t f = file_.get();
  attrs_ = read_attrs(f, path_, nullptr);  // checks format_version first
  if (!expect.tokenizer_sha256.empty() && attrs_.tokenizer_sha256 != expect.tokenizer_sha256)
    fail(path_, "tokenizer_sha256 " + attrs_.tokenizer_sha256 + " does not match the run's " + expect.tokenizer_sha256 +
                    " (prepared with another tokenizer: prepare the data again)");
  if (expect.image_size > 0 && attrs_.image_size != expect.image_size)
    fail(path_, "image_size " + str(attrs_.image_size) + " does not match the run's " + str(expect.image_size));

  std::vector<int64_t> td, md, imd, sd, id;
  tokens_ds_ = open_int_dataset(f, "tokens", 1, path_, td);
  mask_ds_ = open_int_dataset(f, "loss_mask", 1, path_, md);
  images_ds_ = open_int_dataset(f, "images", 4, path_, imd);
  h5::Dataset soff = open_int_dataset(f, "sample_offsets", 1, path_, sd);
  h5::Dataset ioff = open_int_dataset(f, "image_offsets", 1, path_, id);
  std::vector<std::string> problems;
  check_shapes(td, md, imd, sd, id, attrs_.image_size, path_, problems);
  if (!problems.empty()) throw DataError(problems.front());
  sample_offsets_ = read_all_int64(soff.get(), sd[0], path_, "sample_offsets");
  image_offsets_ = read_all_int64(ioff.get(), id[0], path_, "image_offsets");
  check_offsets(sample_offsets_, td[0], "sample_offsets", "tokens", path_, problems);
  check_offsets(image_offsets_, imd[0], "image_offsets", "images", path_, problems);
  if (!problems.empty()) throw DataError(problems.front());
}

Sample ShardReader::read(int64_t i) {
  if (i < 0 || i >= size())
    throw std::out_of_range(path_ + ": sample " + str(i) + " out of range (the shard has " + str(size()) + ")");
  h5::ErrorSilencer quiet;
  const int64_t t0 = sample_offsets_[i], nt = sample_offsets_[i + 1] - t0;
  const int64_t m0 = image_offsets_[i], nm = image_offsets_[i + 1] - m0;
  const hsize_t S = static_cast<hsize_t>(attrs_.image_size);
  if (nm > kMaxImagesPerSample)
    fail(path_, "sample " + str(i) + ": " + str(nm) + " images (at most " + str(kMaxImagesPerSample) + ")");
  Sample s;
  s.n_images = nm;
  s.tokens.resize(nt);
  s.loss_mask.resize(nt);
  s.pixels.resize(nm * S * S * 3);
  read_rows(tokens_ds_.get(), H5T_NATIVE_INT32, t0, nt, {}, s.tokens.data(), path_, "tokens");
  read_rows(mask_ds_.get(), H5T_NATIVE_UINT8, t0, nt, {}, s.loss_mask.data(), path_, "loss_mask");
  read_rows(images_ds_.get(), H5T_NATIVE_UINT8, m0, nm, {S, S, 3}, s.pixels.data(), path_, "images");
  // Cheap guards: a mismatch here would silently misalign images and text in the model.
  const int64_t sentinels = std::count(s.tokens.begin(), s.tokens.end(), kImageSentinel);
  if (sentinels != nm)
    fail(path_, "sample " + str(i) + ": " + str(sentinels) + " image sentinels but " + str(nm) + " images");
  if (std::any_of(s.loss_mask.begin(), s.loss_mask.end(), [](uint8_t m) { return m > 1; }))
    fail(path_, "sample " + str(i) + ": loss_mask holds values other than 0 and 1");
  return s;
}

// ---- verify_shard ----------------------------------------------------------------------

VerifyResult verify_shard(const std::string& path, const std::string& expected_sha256) {
  VerifyResult r;
  r.summary.file = basename_of(path);
  std::vector<std::string>& P = r.problems;
  h5::ErrorSilencer quiet;
  auto done = [&] {
    r.ok = P.empty();
    return r;
  };

  if (!attempt(&P, [&] { r.summary.sha256 = sha256_file(path); })) return done();
  if (!expected_sha256.empty() && r.summary.sha256 != expected_sha256)
    P.push_back(path + ": sha256 " + r.summary.sha256 + " does not match the expected " + expected_sha256 +
                " (file changed or corrupted)");

  h5::File file;
  if (!attempt(&P, [&] { file = h5::open_read_only(path, "shard file"); })) return done();
  const hid_t f = file.get();
  const ShardAttrs attrs = read_attrs(f, path, &P);

  // Datasets: any that fails to open is a problem; checks needing it are skipped.
  std::vector<int64_t> td, md, imd, sd, id;
  h5::Dataset tokens, mask, images, soff, ioff;
  attempt(&P, [&] { tokens = open_int_dataset(f, "tokens", 1, path, td); });
  attempt(&P, [&] { mask = open_int_dataset(f, "loss_mask", 1, path, md); });
  attempt(&P, [&] { images = open_int_dataset(f, "images", 4, path, imd); });
  attempt(&P, [&] { soff = open_int_dataset(f, "sample_offsets", 1, path, sd); });
  attempt(&P, [&] { ioff = open_int_dataset(f, "image_offsets", 1, path, id); });
  if (attrs.image_size >= 1) check_shapes(td, md, imd, sd, id, attrs.image_size, path, P);
  if (!attrs.image_mode.empty() && attrs.image_mode != "pad" && attrs.image_mode != "crop")
    P.push_back(path + ": image_mode '" + attrs.image_mode + "' (must be pad or crop)");
  const int64_t T = tokens ? td[0] : -1, M = images ? imd[0] : -1;
  r.summary.tokens = std::max<int64_t>(T, 0);
  r.summary.images = std::max<int64_t>(M, 0);

  // Offsets: read whole (16 bytes per sample), then the invariants.
  std::vector<int64_t> so, io;
  bool offsets_ok = false;
  if (soff && ioff && attempt(&P, [&] {
        so = read_all_int64(soff.get(), sd[0], path, "sample_offsets");
        io = read_all_int64(ioff.get(), id[0], path, "image_offsets");
      })) {
    r.summary.samples = std::max<int64_t>(static_cast<int64_t>(so.size()) - 1, 0);
    const size_t before = P.size();
    if (T >= 0) check_offsets(so, T, "sample_offsets", "tokens", path, P);
    if (M >= 0) check_offsets(io, M, "image_offsets", "images", path, P);
    offsets_ok = T >= 0 && M >= 0 && P.size() == before && so.size() == io.size();
  }

  // Tokens and mask, streamed in blocks: mask values, and sentinels counted per sample.
  const bool can_stream = tokens && mask && md[0] == T;
  std::vector<int64_t> sentinels(offsets_ok ? so.size() - 1 : 0, 0);
  if (can_stream) {
    attempt(&P, [&] {
      const int64_t block = kVerifyBlockBytes / sizeof(int32_t);
      std::vector<int32_t> tok;
      std::vector<uint8_t> msk;
      int64_t bad_mask = 0, first_bad = -1;
      size_t s = 0;  // the sample holding position pos (when the offsets are valid)
      for (int64_t b = 0; b < T; b += block) {
        const int64_t n = std::min(block, T - b);
        tok.resize(n);
        msk.resize(n);
        read_rows(tokens.get(), H5T_NATIVE_INT32, b, n, {}, tok.data(), path, "tokens");
        read_rows(mask.get(), H5T_NATIVE_UINT8, b, n, {}, msk.data(), path, "loss_mask");
        for (int64_t j = 0; j < n; ++j) {
          if (msk[j] > 1 && bad_mask++ == 0) first_bad = b + j;
          if (offsets_ok && tok[j] == kImageSentinel) {
            while (so[s + 1] <= b + j) ++s;
            ++sentinels[s];
          }
        }
      }
      if (bad_mask > 0)
        P.push_back(path + ": loss_mask has " + str(bad_mask) + " values other than 0 and 1 (first at " + str(first_bad) + ")");
    });
  }
  if (offsets_ok && can_stream) {
    int64_t bad = 0;
    for (size_t s = 0; s + 1 < so.size(); ++s) {
      const int64_t nimg = io[s + 1] - io[s];
      std::string what;
      if (sentinels[s] != nimg) what = str(sentinels[s]) + " image sentinels but " + str(nimg) + " images";
      else if (nimg > kMaxImagesPerSample) what = str(nimg) + " images (at most " + str(kMaxImagesPerSample) + ")";
      if (what.empty()) continue;
      if (bad++ < kMaxProblemsPerKind) P.push_back(path + ": sample " + str(s) + ": " + what);
    }
    if (bad > kMaxProblemsPerKind)
      P.push_back(path + ": ... and " + str(bad - kMaxProblemsPerKind) + " more samples with a bad image count");
  }

  // Every image must be readable (a truncated or damaged chunk fails here).
  if (images && imd[1] > 0 && imd[2] > 0 && imd[3] > 0) {
    attempt(&P, [&] {
      const std::vector<hsize_t> row{static_cast<hsize_t>(imd[1]), static_cast<hsize_t>(imd[2]), static_cast<hsize_t>(imd[3])};
      const int64_t row_bytes = imd[1] * imd[2] * imd[3];
      const int64_t block = std::max<int64_t>(1, kVerifyBlockBytes / row_bytes);
      std::vector<uint8_t> buf;
      for (int64_t b = 0; b < M; b += block) {
        const int64_t n = std::min(block, M - b);
        buf.resize(n * row_bytes);
        read_rows(images.get(), H5T_NATIVE_UINT8, b, n, row, buf.data(), path, "images");
      }
    });
  }
  return done();
}

}  // namespace vchat::data
