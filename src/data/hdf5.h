// Tiny RAII wrappers over the HDF5 C API (hid_t handles) and a scope guard that turns off
// HDF5's automatic error printing. We check every return value ourselves and throw
// DataError naming the file, so HDF5's stack dumps on stderr would only be noise.
//
// Threads: Debian's serial libhdf5 is built thread-safe (H5_HAVE_THREADSAFE: one global
// lock inside the library, per-thread error stacks), so separate objects may be used from
// separate threads. A library built without it must only be used from one thread at a time.
#pragma once
#include <hdf5.h>

#include <string>
#include <utility>

namespace vchat::data::h5 {

// Owns one hid_t and closes it with the matching H5*close. Move-only.
template <herr_t (*Close)(hid_t)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : id_(std::exchange(o.id_, H5I_INVALID_HID)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }  // HDF5 calls return a negative id on failure
  explicit operator bool() const { return valid(); }
  // Gives up ownership, e.g. to close by hand and check the result (H5Fclose flushes).
  hid_t release() { return std::exchange(id_, H5I_INVALID_HID); }
  // Closes now; a failure is ignored (destructor path: nothing useful to do with it).
  void reset() {
    if (valid()) Close(id_);
    id_ = H5I_INVALID_HID;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
};

using File = Handle<H5Fclose>;
using Group = Handle<H5Gclose>;
using Dataset = Handle<H5Dclose>;
using Dataspace = Handle<H5Sclose>;
using Attribute = Handle<H5Aclose>;
using PropList = Handle<H5Pclose>;
using Datatype = Handle<H5Tclose>;

// While alive, HDF5 prints nothing on errors (this thread's default error stack); the
// previous handler is restored on scope exit. Put one at the top of every entry point that
// calls HDF5 and reports failures itself.
class ErrorSilencer {
 public:
  ErrorSilencer();
  ~ErrorSilencer();
  ErrorSilencer(const ErrorSilencer&) = delete;
  ErrorSilencer& operator=(const ErrorSilencer&) = delete;

 private:
  H5E_auto2_t old_func_ = nullptr;
  void* old_data_ = nullptr;
  bool saved_ = false;
};

// The most specific message on this thread's HDF5 error stack (e.g. "truncated file:
// eof = 1024, ..."), or "" when the stack is empty. Call right after the failing call.
std::string last_error();

// " (HDF5: <last_error()>)" or "" when there is none: appended to our own messages.
std::string error_suffix();

// Errors name the file: DataError("<path>: <what>"), fail_h5 adds HDF5's own message.
[[noreturn]] void fail(const std::string& path, const std::string& what);
[[noreturn]] void fail_h5(const std::string& path, const std::string& what);

// Opens an existing file read-only without file locking (our files are immutable once
// published); `kind` names what it should be ("shard file") in the error for a directory.
File open_read_only(const std::string& path, const char* kind);

// Scalar attributes; a missing or mistyped one is a DataError naming the file and attribute.
void write_int_attr(hid_t obj, const char* name, hid_t file_type, int64_t v, const std::string& path);
void write_str_attr(hid_t obj, const char* name, const std::string& v, const std::string& path);  // variable-length UTF-8
Attribute open_attr(hid_t obj, const char* name, const std::string& path);
int64_t read_int_attr(hid_t obj, const char* name, const std::string& path);
std::string read_str_attr(hid_t obj, const char* name, const std::string& path);  // variable or fixed length

}  // namespace vchat::data::h5
