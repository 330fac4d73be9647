#include "checkpoint/saver.h"

#include <fcntl.h>   // AT_FDCWD
#include <signal.h>  // the test hook's SIGKILL
#include <stdio.h>   // renameat2, RENAME_EXCHANGE
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>

#include "data/sample.h"
#include "data/sha256.h"
#include "data/manifest.h"
#include "data/shard.h"

namespace vchat::ckpt {

namespace fs = std::filesystem;
using data::DataError;

// One save in flight: what this rank writes, and how it went.
struct CheckpointSaver::Job {
  Manifest base;
  std::string frozen_name;  // only when this save writes the frozen set
  struct File {
    std::string dir;  // the .tmp directory
    std::vector<PieceRef> pieces;
    std::vector<const float*> data;
    FileEntry entry;
  };
  File step_file, frozen_file;
  // State on a GPU is copied to the host when the save starts (the step loop then moves on);
  // the pieces point into these copies.
  std::vector<Tensor> host_copies;
  // step_file.data points at the live state: the writer thread first builds the step's rank
  // file in memory from it (the snapshot, while the next step's forward and backward, which
  // read but never write it, run), then writes that image.
  std::mutex mu;
  std::condition_variable cv;
  bool snapshot_done = false;
  std::atomic<int> status{writing};
  std::string error;
  double snapshot_seconds = 0, write_seconds = 0, hash_seconds = 0;
};

namespace {

// Test hook (tests/e2e/checkpoint_crash.sh): with VCHAT_CKPT_CRASH_AT=<point>, the world rank
// VCHAT_CKPT_CRASH_RANK (default 0) kills itself with SIGKILL at that point of the save of
// step VCHAT_CKPT_CRASH_STEP (default: any), exactly as `kill -9` would.
void crash_point(const char* point, int rank, int64_t step) {
  static const char* at = std::getenv("VCHAT_CKPT_CRASH_AT");
  if (!at || std::strcmp(at, point) != 0) return;
  const char* r = std::getenv("VCHAT_CKPT_CRASH_RANK");
  const char* st = std::getenv("VCHAT_CKPT_CRASH_STEP");
  if ((r ? std::atoi(r) : 0) != rank || (st && std::atoll(st) != step)) return;
  std::fprintf(stderr, "vchat-train: test hook: rank %d killed at '%s' of the save of step %lld\n", rank, point,
               static_cast<long long>(step));
  std::fflush(stderr);
  ::kill(::getpid(), SIGKILL);
}

void remove_tree(const fs::path& p) {
  // Renamed out of the way first, so a kill in the middle leaves no half-deleted directory
  // under a name that looks like a checkpoint.
  std::error_code ec;
  const fs::path doomed = p.parent_path() / (".deleting." + p.filename().string());
  fs::rename(p, doomed, ec);
  fs::remove_all(ec ? p : doomed, ec);
}

}  // namespace

CheckpointSaver::CheckpointSaver(const SaveOptions& opt, const Grid& grid, std::string frozen_ref,
                                 std::string frozen_sha256)
    : opt_(opt), grid_(grid), frozen_ref_(std::move(frozen_ref)), frozen_sha_(std::move(frozen_sha256)) {
  Comm& world = grid_.world();
  if (world.rank() == 0) {
    std::error_code ec;
    fs::create_directories(opt_.dir, ec);
    if (ec) throw DataError("--save-dir " + opt_.dir + ": cannot create: " + ec.message());
    // Leftovers of interrupted saves: unfinished directories and half-done deletions.
    for (const auto& e : fs::directory_iterator(opt_.dir, ec)) {
      const std::string name = e.path().filename().string();
      const bool tmp = name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0;
      if (name.rfind(".deleting.", 0) == 0 || name == std::string(kLatestName) + ".tmp" ||
          (tmp && (name.rfind("step_", 0) == 0 || name.rfind("frozen_", 0) == 0)))
        fs::remove_all(e.path(), ec);
    }
    const std::string probe = (fs::path(opt_.dir) / ".write_probe").string();
    std::ofstream out(probe);
    if (!out || !(out << "x") || !(out.flush())) throw DataError("--save-dir " + opt_.dir + ": not writable");
    out.close();
    fs::remove(probe, ec);
    run_id_ = std::random_device{}() | (static_cast<uint64_t>(std::random_device{}()) << 32);
  }
  world.broadcast(&run_id_, sizeof run_id_, 0);
}

CheckpointSaver::~CheckpointSaver() {
  if (writer_.joinable()) writer_.join();
}

void CheckpointSaver::start(const std::vector<StateSlice>& state, const Manifest& base) {
  if (pending_) finish();
  const GridCoord c = grid_.coord();
  const int dp = grid_.shape().dp, rank = grid_.world().rank();
  auto job = std::make_unique<Job>();
  job->base = base;
  job->step_file.dir = (fs::path(opt_.dir) / (step_dir_name(base.step) + ".tmp")).string();
  const bool write_frozen = frozen_ref_.empty();
  if (write_frozen) {
    job->frozen_name = frozen_dir_name(base.step, run_id_);
    job->frozen_file.dir = (fs::path(opt_.dir) / (job->frozen_name + ".tmp")).string();
  }
  for (const StateSlice& s : state) {
    if (!s.param->counts_in_norm) continue;  // another TP replica writes it
    int64_t b = s.begin, e = s.end;
    if (s.dp_replicated) {  // DP ranks share the writing: 1/dp each
      const int64_t n = s.end - s.begin;
      b = s.begin + n * c.dp / dp;
      e = s.begin + n * (c.dp + 1) / dp;
    }
    if (b >= e) continue;
    const PieceRef ref{s.param->name, s.kind, s.param->shard, b, e};
    if (!s.param->trainable && !write_frozen) continue;  // written once per run (below)
    const float* src = nullptr;
    if (s.data.device() == Device::cpu) {
      src = s.data.data<float>() + (b - s.begin);
    } else {
      job->host_copies.push_back(Tensor::empty({e - b}));
      job->host_copies.back().copy_from(s.data.slice(0, b - s.begin, e - s.begin));
      src = job->host_copies.back().data<float>();
    }
    if (!s.param->trainable) {
      // Frozen values never change: written once per run, straight from where they live.
      job->frozen_file.pieces.push_back(ref);
      job->frozen_file.data.push_back(src);
    } else {
      job->step_file.pieces.push_back(ref);
      job->step_file.data.push_back(src);
    }
  }
  job->step_file.entry = {rank_file_name(rank), rank, 0, "", job->step_file.pieces};
  job->frozen_file.entry = {rank_file_name(rank), rank, 0, "", job->frozen_file.pieces};
  last_ = {};
  pending_ = std::move(job);
  if (opt_.sync) {
    run_job(*pending_);
  } else {
    Job* j = pending_.get();
    writer_ = std::thread([this, j] { run_job(*j); });
  }
}

void CheckpointSaver::wait_snapshot() {
  if (!pending_) return;
  std::unique_lock<std::mutex> lock(pending_->mu);
  pending_->cv.wait(lock, [&] { return pending_->snapshot_done; });
}

void CheckpointSaver::run_job(Job& job) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    nlohmann::json meta = job.base.to_json();
    meta.erase("files");
    meta["rank"] = job.step_file.entry.rank;
    // 1. The snapshot: the step's rank file built in memory from the live state; after this
    //    the optimizer may update it again.
    RankImage step_image;
    std::exception_ptr snapshot_error;
    try {
      step_image = build_rank_image(job.step_file.pieces, job.step_file.data, job.base.step, job.step_file.entry.rank,
                                    meta, step_buffer_);
    } catch (...) {
      snapshot_error = std::current_exception();
    }
    job.snapshot_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    {
      std::lock_guard<std::mutex> lock(job.mu);
      job.snapshot_done = true;
    }
    job.cv.notify_all();
    if (snapshot_error) std::rethrow_exception(snapshot_error);
    // 2. The files: the step's image, then (first save) the frozen set's, each written
    //    (O_DIRECT where possible), hashed on the way, fsynced.
    for (Job::File* f : {&job.step_file, &job.frozen_file}) {
      if (f->dir.empty()) continue;
      RankImage frozen_image;
      ImageBuffer frozen_buffer;  // once per run: not kept
      if (f == &job.frozen_file)
        frozen_image = build_rank_image(f->pieces, f->data, job.base.step, f->entry.rank, meta, frozen_buffer);
      const RankImage& image = f == &job.step_file ? step_image : frozen_image;
      std::error_code ec;
      fs::create_directories(f->dir, ec);
      if (ec) throw DataError(f->dir + ": cannot create: " + ec.message());
      const std::string path = (fs::path(f->dir) / f->entry.name).string();
      fs::remove(path, ec);  // a stale one from an interrupted save of the same step
      const WriteStats w = write_rank_image(path, image);
      data::fsync_path(f->dir);
      job.write_seconds += w.write_seconds;
      job.hash_seconds += w.hash_seconds;
      f->entry.bytes = static_cast<int64_t>(image.size);
      f->entry.sha256 = w.sha256;
      crash_point(f == &job.step_file ? "step-file-written" : "frozen-file-written", f->entry.rank, job.base.step);
    }
    job.status = written;
  } catch (const std::exception& e) {
    job.error = e.what();
    job.status = failed;
  }
  {  // whatever failed, the trainer must not wait for a snapshot forever
    std::lock_guard<std::mutex> lock(job.mu);
    job.snapshot_done = true;
  }
  job.cv.notify_all();
}

CheckpointSaver::LocalStatus CheckpointSaver::local_status() const {
  return pending_ ? static_cast<LocalStatus>(pending_->status.load()) : written;
}

std::string CheckpointSaver::error() const { return pending_ ? pending_->error : std::string(); }

void CheckpointSaver::wait_local() {
  if (writer_.joinable()) writer_.join();
}

// Rank 0 receives every rank's file entries (JSON), in rank order.
std::string CheckpointSaver::gather_entries(const std::vector<FileEntry>& mine,
                                            std::vector<std::vector<FileEntry>>* all_out) {
  Comm& world = grid_.world();
  auto encode = [](const std::vector<FileEntry>& v) {
    Manifest m;
    m.files = v;
    return m.to_json()["files"].dump();
  };
  const std::string text = encode(mine);
  if (world.rank() != 0) {
    const int64_t n = static_cast<int64_t>(text.size());
    world.send(&n, sizeof n, 0);
    world.send(text.data(), n, 0);
    return "";
  }
  all_out->assign(world.size(), {});
  for (int r = 0; r < world.size(); ++r) {
    std::string t = text;
    if (r > 0) {
      int64_t n = 0;
      world.recv(&n, sizeof n, r);
      t.assign(static_cast<size_t>(n), '\0');
      world.recv(t.data(), n, r);
    }
    nlohmann::json j = Manifest().to_json();
    j["files"] = nlohmann::json::parse(t);
    (*all_out)[r] = Manifest::from_json(j, "rank " + std::to_string(r) + "'s file list").files;
  }
  return text;
}

std::string CheckpointSaver::publish() {
  if (!pending_) throw std::logic_error("CheckpointSaver::publish without a save in flight");
  wait_local();
  Job& job = *pending_;
  if (job.status != written) throw std::logic_error("CheckpointSaver::publish before this rank's file was written");
  const bool wrote_frozen = !job.frozen_name.empty();
  std::vector<FileEntry> mine = {job.step_file.entry};
  if (wrote_frozen) mine.push_back(job.frozen_file.entry);
  std::vector<std::vector<FileEntry>> all;
  gather_entries(mine, &all);
  const std::string final_dir = (fs::path(opt_.dir) / step_dir_name(job.base.step)).string();
  if (grid_.world().rank() == 0) {
    std::error_code ec;
    // The frozen set first: the step's manifest refers to it by its manifest's hash.
    if (wrote_frozen) {
      Manifest fm = job.base;
      fm.kind = "frozen";
      fm.files.clear();
      for (auto& e : all) fm.files.push_back(e.at(1));
      const std::string fdir = (fs::path(opt_.dir) / job.frozen_name).string();
      data::write_file_atomic((fs::path(job.frozen_file.dir) / kManifestName).string(), fm.to_json().dump(1));
      data::write_file_atomic((fs::path(job.frozen_file.dir) / kCompleteName).string(), "");
      crash_point("frozen-complete", 0, job.base.step);
      fs::rename(job.frozen_file.dir, fdir, ec);  // the name carries this run's id: never taken
      if (ec) throw DataError(fdir + ": rename from " + job.frozen_file.dir + " failed: " + ec.message());
      data::fsync_path(opt_.dir);
      crash_point("frozen-published", 0, job.base.step);
      frozen_sha_ = data::sha256_file((fs::path(fdir) / kManifestName).string());
    }
    Manifest m = job.base;
    m.files.clear();
    for (auto& e : all) m.files.push_back(e.at(0));
    m.frozen_dir = wrote_frozen ? job.frozen_name : frozen_ref_;
    m.frozen_manifest_sha256 = frozen_sha_;
    data::write_file_atomic((fs::path(job.step_file.dir) / kManifestName).string(), m.to_json().dump(1));
    crash_point("manifest-written", 0, job.base.step);
    data::write_file_atomic((fs::path(job.step_file.dir) / kCompleteName).string(), "");
    crash_point("complete-written", 0, job.base.step);
    // A same-numbered checkpoint exists when this run resumed from an older one: swap the
    // new one in atomically (renameat2 RENAME_EXCHANGE), so `latest`, which may name it,
    // never points at a missing directory; then remove the old one.
    if (fs::exists(final_dir, ec)) {
      if (::renameat2(AT_FDCWD, job.step_file.dir.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) != 0)
        throw DataError(final_dir + ": exchanging with " + job.step_file.dir + " failed: " + std::strerror(errno));
      remove_tree(job.step_file.dir);
    } else {
      fs::rename(job.step_file.dir, final_dir, ec);
      if (ec) throw DataError(final_dir + ": rename from " + job.step_file.dir + " failed: " + ec.message());
    }
    data::fsync_path(opt_.dir);
    crash_point("renamed", 0, job.base.step);
    data::write_file_atomic((fs::path(opt_.dir) / kLatestName).string(), step_dir_name(job.base.step) + "\n");
    crash_point("latest-written", 0, job.base.step);
  }
  if (wrote_frozen) frozen_ref_ = job.frozen_name;
  if (grid_.world().rank() == 0) prune(frozen_ref_);
  last_.step = job.base.step;
  last_.snapshot_seconds = job.snapshot_seconds;
  last_.write_seconds = job.write_seconds;
  last_.hash_seconds = job.hash_seconds;
  last_.bytes = job.step_file.entry.bytes + (wrote_frozen ? job.frozen_file.entry.bytes : 0);
  pending_.reset();
  return final_dir;
}

std::string CheckpointSaver::finish() {
  if (!pending_) return "";
  wait_local();
  double failed = pending_->status == CheckpointSaver::failed ? 1 : 0;
  grid_.world().all_reduce_f64(&failed, 1, ReduceOp::max);
  if (failed > 0) {
    const std::string mine = pending_->error;
    const int64_t step = pending_->base.step;
    pending_.reset();
    const auto latest = latest_checkpoint(opt_.dir);
    throw DataError("saving checkpoint step " + std::to_string(step) + " failed" +
                    (mine.empty() ? std::string(" on another rank") : ": " + mine) + "; " +
                    (latest ? "the last complete checkpoint, " + *latest + ", is unchanged"
                            : std::string("no earlier checkpoint exists")));
  }
  return publish();
}

void CheckpointSaver::prune(const std::string& keep_frozen) {
  auto all = list_checkpoints(opt_.dir);
  if (opt_.keep_last > 0 && static_cast<int>(all.size()) > opt_.keep_last) {
    const size_t drop = all.size() - static_cast<size_t>(opt_.keep_last);
    for (size_t i = 0; i < drop; ++i) {
      remove_tree(all[i].second);
      crash_point("pruning", 0, all.back().first);
    }
    all.erase(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(drop));
  }
  // Frozen sets no remaining checkpoint refers to (nor this run).
  std::vector<std::string> referenced = {keep_frozen};
  for (const auto& [step, dir] : all) {
    try {
      referenced.push_back(read_manifest(dir).frozen_dir);
    } catch (const std::exception&) {
      return;  // unreadable: keep every frozen set rather than guess
    }
  }
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(opt_.dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("frozen_", 0) != 0 || name.find(".tmp") != std::string::npos) continue;
    if (std::find(referenced.begin(), referenced.end(), name) == referenced.end()) remove_tree(e.path());
  }
}

}  // namespace vchat::ckpt
