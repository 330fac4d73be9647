#include "checkpoint/rank_file.h"

#include <filesystem>

#include "data/sample.h"
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

void write_rank_file(const std::string& path, const std::vector<PieceRef>& pieces, const std::vector<const float*>& data,
                     int64_t step, int rank, const nlohmann::json& meta) {
  h5::ErrorSilencer quiet;
  {
    h5::File f(H5Fcreate(path.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT));
    if (!f) fail_h5(path, "cannot create the checkpoint file");
    h5::write_str_attr(f.get(), "format", kFormat, path);
    h5::write_int_attr(f.get(), "format_version", H5T_STD_I32LE, kFormatVersion, path);
    h5::write_int_attr(f.get(), "step", H5T_STD_I64LE, step, path);
    h5::write_int_attr(f.get(), "rank", H5T_STD_I32LE, rank, path);
    h5::write_str_attr(f.get(), "meta", meta.dump(), path);
    for (const char* g : {"value", "adam_m", "adam_v"}) {
      h5::Group grp(H5Gcreate2(f.get(), g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
      if (!grp) fail_h5(path, std::string("cannot create group '") + g + "'");
    }
    for (size_t i = 0; i < pieces.size(); ++i) {
      const PieceRef& p = pieces[i];
      const std::string name = p.dataset();
      const hsize_t n = static_cast<hsize_t>(p.size());
      h5::Dataspace space(H5Screate_simple(1, &n, nullptr));
      h5::Dataset ds(H5Dcreate2(f.get(), name.c_str(), H5T_IEEE_F32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
      if (!ds) fail_h5(path, "cannot create dataset '" + name + "'");
      if (n && H5Dwrite(ds.get(), H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data[i]) < 0)
        fail_h5(path, "writing dataset '" + name + "' failed (disk full?)");
      write_i64_array_attr(ds.get(), "full_shape", p.shard.full, path);
      write_i64_array_attr(ds.get(), "shard", {p.shard.dim, p.shard.index, p.shard.count}, path);
      write_i64_array_attr(ds.get(), "range", {p.begin, p.end}, path);
    }
    // H5Fclose flushes: its failure (a full disk) must be seen, not lost in a destructor.
    if (H5Fclose(f.release()) < 0) fail_h5(path, "closing (flushing) the file failed (disk full?)");
  }
  data::fsync_path(path);
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
