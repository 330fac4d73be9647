#include "checkpoint/reshard.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <set>

#include "checkpoint/inspect.h"
#include "data/sample.h"
#include "data/sha256.h"

namespace vchat::ckpt {

namespace fs = std::filesystem;
using data::DataError;

namespace {

// A slice as a rectangle of the full tensor viewed as [rows, cols] (1-D: [n, 1]).
struct Rect {
  int64_t r0, r1, c0, c1;
  int64_t width() const { return c1 - c0; }
};

Rect rect_of(const ShardSpec& s) {
  const int64_t R = s.full.at(0), C = s.full.size() > 1 ? s.full[1] : 1;
  Rect r{0, R, 0, C};
  if (s.dim == 0) r = {s.index * (R / s.count), (s.index + 1) * (R / s.count), 0, C};
  if (s.dim == 1) r = {0, R, s.index * (C / s.count), (s.index + 1) * (C / s.count)};
  return r;
}

}  // namespace

std::vector<CopyRun> overlap_runs(const PieceRef& stored, const PieceRef& wanted) {
  std::vector<CopyRun> runs;
  const Rect s = rect_of(stored.shard), w = rect_of(wanted.shard);
  if (s.width() == 0 || w.width() == 0 || stored.size() == 0 || wanted.size() == 0) return runs;
  // Only the rows both flat ranges touch.
  const int64_t row_lo = std::max({s.r0, w.r0, s.r0 + stored.begin / s.width(), w.r0 + wanted.begin / w.width()});
  const int64_t row_hi = std::min({s.r1, w.r1, s.r0 + (stored.end - 1) / s.width() + 1, w.r0 + (wanted.end - 1) / w.width() + 1});
  const int64_t c0 = std::max(s.c0, w.c0), c1 = std::min(s.c1, w.c1);
  if (c0 >= c1) return runs;
  for (int64_t r = row_lo; r < row_hi; ++r) {
    // The row's overlapping columns, as flat positions in each slice; then clipped to both ranges.
    int64_t sa = (r - s.r0) * s.width() + (c0 - s.c0), da = (r - w.r0) * w.width() + (c0 - w.c0), len = c1 - c0;
    const int64_t skip = std::max({int64_t{0}, stored.begin - sa, wanted.begin - da});
    sa += skip;
    da += skip;
    len -= skip;
    len = std::min({len, stored.end - sa, wanted.end - da});
    if (len <= 0) continue;
    const int64_t src = sa - stored.begin, dst = da - wanted.begin;
    if (!runs.empty() && runs.back().src + runs.back().len == src && runs.back().dst + runs.back().len == dst)
      runs.back().len += len;  // contiguous in both: one copy
    else
      runs.push_back({src, dst, len});
  }
  return runs;
}

// The files of a checkpoint and its frozen set, opened (and verified) on first use.
class CheckpointReader::Sources {
 public:
  Sources(const std::string& dir, const Manifest& m) {
    add(dir, m);
    if (!m.frozen_dir.empty()) {
      const std::string fdir = (fs::path(dir).parent_path() / m.frozen_dir).string();
      std::error_code ec;
      if (!fs::is_directory(fdir, ec))
        throw DataError(dir + ": refers to frozen tensors in " + fdir + ", which is missing (removed by hand?)");
      const std::string fm = (fs::path(fdir) / kManifestName).string();
      const Manifest frozen = read_manifest(fdir);
      if (data::sha256_file(fm) != m.frozen_manifest_sha256)
        throw DataError(fm + ": SHA-256 differs from the one " + dir + "/manifest.json refers to");
      add(fdir, frozen);
    }
  }
  struct Piece {
    size_t file;
    PieceRef ref;
  };
  const std::vector<Piece>& pieces_of(const std::string& param, StateKind k) const {
    static const std::vector<Piece> none;
    auto it = index_.find({param, k});
    return it == index_.end() ? none : it->second;
  }
  const RankFileReader& open(size_t i, LoadStats& st) {
    File& f = files_[i];
    if (!f.reader) {
      std::error_code ec;
      if (!fs::exists(f.path, ec))
        throw DataError(f.path + ": rank file missing (listed in " + f.dir + "/manifest.json)");
      const int64_t bytes = static_cast<int64_t>(fs::file_size(f.path, ec));
      if (bytes != f.entry.bytes)
        throw DataError(f.path + ": " + std::to_string(bytes) + " bytes, the manifest says " +
                        std::to_string(f.entry.bytes) + " (truncated or overwritten)");
      if (data::sha256_file(f.path) != f.entry.sha256)
        throw DataError(f.path + ": SHA-256 mismatch with the manifest (the file is corrupt)");
      st.bytes_verified += bytes;
      ++st.files_opened;
      f.reader = std::make_unique<RankFileReader>(f.path);
    }
    return *f.reader;
  }

 private:
  struct File {
    std::string dir, path;
    FileEntry entry;
    std::unique_ptr<RankFileReader> reader;
  };
  void add(const std::string& dir, const Manifest& m) {
    for (const FileEntry& e : m.files) {
      const size_t i = files_.size();
      files_.push_back({dir, (fs::path(dir) / e.name).string(), e, nullptr});
      for (const PieceRef& p : e.pieces) index_[{p.param, p.kind}].push_back({i, p});
    }
  }
  std::vector<File> files_;
  std::map<std::pair<std::string, StateKind>, std::vector<Piece>> index_;
};

CheckpointReader::CheckpointReader(const std::string& dir, const Manifest& m)
    : dir_(dir), src_(std::make_unique<Sources>(dir, m)) {}
CheckpointReader::~CheckpointReader() = default;

LoadStats load_pieces(const std::string& dir, const Manifest& m, const std::vector<Want>& wants) {
  CheckpointReader r(dir, m);
  r.load(wants);
  return r.stats();
}

void CheckpointReader::load(const std::vector<Want>& wants) {
  const std::string& dir = dir_;
  Sources& src = *src_;
  LoadStats& st = stats_;
  std::vector<float> buf;
  for (const Want& w : wants) {
    const PieceRef& want = w.ref;
    const std::string what = std::string(state_kind_name(want.kind)) + " of " + want.param;
    int64_t filled = 0;
    for (const auto& piece : src.pieces_of(want.param, want.kind)) {
      if (piece.ref.shard.full != want.shard.full)
        throw DataError(dir + ": " + what + " has shape " + shape_str(piece.ref.shard.full) + " there, " +
                        shape_str(want.shard.full) + " in this run's model");
      const std::vector<CopyRun> runs = overlap_runs(piece.ref, want);
      if (runs.empty()) continue;
      // One read covering every run of this piece (at most the piece itself), then copies.
      int64_t lo = runs.front().src, hi = 0;
      for (const CopyRun& r : runs) {
        lo = std::min(lo, r.src);
        hi = std::max(hi, r.src + r.len);
      }
      buf.resize(static_cast<size_t>(hi - lo));
      src.open(piece.file, st).read(piece.ref, piece.ref.begin + lo, piece.ref.begin + hi, buf.data());
      st.bytes_read += (hi - lo) * 4;
      for (const CopyRun& r : runs) {
        std::copy_n(buf.data() + (r.src - lo), r.len, w.dst + r.dst);
        filled += r.len;
      }
    }
    if (filled != want.size())
      throw DataError(dir + ": the checkpoint " + (filled == 0 ? "has no " : "does not cover exactly the ") + what +
                      " needed (elements " + std::to_string(want.begin) + ".." + std::to_string(want.end) +
                      " of its slice; " + std::to_string(filled) + " found): it was written for another model or train set");
  }
}

LoadStats load_state(const std::string& dir, const Manifest& m, const std::vector<StateSlice>& state) {
  std::vector<Want> wants;
  std::vector<std::pair<Tensor, Tensor>> to_device;  // (host staging, device slice)
  for (const StateSlice& s : state) {
    if (!s.data.is_contiguous() || s.data.numel() != s.end - s.begin)
      throw std::logic_error("load_state: slice of " + s.param->name + " is not a contiguous [end - begin] view");
    float* dst = nullptr;
    if (s.data.device() == Device::cpu) {
      dst = s.data.data<float>();
    } else {  // GPU state: read into the host, then one copy each
      to_device.emplace_back(Tensor::empty({s.end - s.begin}), s.data);
      dst = to_device.back().first.data<float>();
    }
    wants.push_back({{s.param->name, s.kind, s.param->shard, s.begin, s.end}, dst});
  }
  const LoadStats stats = load_pieces(dir, m, wants);
  for (auto& [host, device] : to_device) device.copy_from(host);
  return stats;
}

InitReport load_values(const std::string& dir, const Manifest& m, const std::vector<StateSlice>& state,
                       const std::function<bool(const Param&)>& may_stay) {
  const ParamTable table = table_of(m, dir);
  InitReport r;
  std::vector<StateSlice> values;
  std::set<std::string> kept;
  for (const StateSlice& s : state) {
    if (s.kind != StateKind::value) continue;
    const ParamSpec* spec = table.find(s.param->name);
    if (!spec) {
      if (!may_stay(*s.param))
        throw DataError(dir + ": the checkpoint has no parameter '" + s.param->name + "', which this run's model needs");
      kept.insert(s.param->name);
      continue;
    }
    if (spec->full != s.param->shard.full)
      throw DataError(dir + ": parameter '" + s.param->name + "' is " + shape_str(spec->full) + " in the checkpoint, " +
                      shape_str(s.param->shard.full) + " in this run's model");
    values.push_back(s);
  }
  r.stats = load_state(dir, m, values);
  r.loaded = static_cast<int64_t>(values.size());
  r.kept.assign(kept.begin(), kept.end());
  return r;
}

InitReport load_values(const std::string& dir, const Manifest& m, ParamStore& store,
                       const std::function<bool(const Param&)>& may_stay) {
  std::vector<StateSlice> slices;
  for (const auto& p : store.all())
    slices.push_back({p.get(), StateKind::value, 0, p->value.numel(), p->value.reshape({p->value.numel()}), false});
  return load_values(dir, m, slices, may_stay);
}

}  // namespace vchat::ckpt
