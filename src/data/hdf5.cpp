#include "data/hdf5.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "data/sample.h"

namespace vchat::data::h5 {

ErrorSilencer::ErrorSilencer() {
  saved_ = H5Eget_auto2(H5E_DEFAULT, &old_func_, &old_data_) >= 0;
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

ErrorSilencer::~ErrorSilencer() {
  if (saved_) H5Eset_auto2(H5E_DEFAULT, old_func_, old_data_);
}

namespace {
// H5Ewalk2 upward starts at the innermost (most specific) error: keep the first one.
herr_t take_first(unsigned n, const H5E_error2_t* err, void* out) {
  auto* s = static_cast<std::string*>(out);
  if (s->empty() && err && err->desc) *s = err->desc;
  return 0;
}
}  // namespace

std::string last_error() {
  std::string msg;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, take_first, &msg);
  return msg;
}

std::string error_suffix() {
  std::string e = last_error();
  for (char& c : e)
    if (c == '\n' || c == '\r') c = ' ';  // HDF5 puts a ctime() with its newline inside some messages
  return e.empty() ? std::string() : " (HDF5: " + e + ")";
}

[[noreturn]] void fail(const std::string& path, const std::string& what) { throw DataError(path + ": " + what); }
// For a failed HDF5 call: adds the innermost HDF5 error message.
[[noreturn]] void fail_h5(const std::string& path, const std::string& what) {
  throw DataError(path + ": " + what + error_suffix());
}

void write_int_attr(hid_t obj, const char* name, hid_t file_type, int64_t v, const std::string& path) {
  Dataspace space(H5Screate(H5S_SCALAR));
  Attribute a(H5Acreate2(obj, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT));
  if (!a || H5Awrite(a.get(), H5T_NATIVE_INT64, &v) < 0) fail_h5(path, std::string("writing attribute '") + name + "' failed");
}

// Variable-length UTF-8: what h5py writes for a Python str, so Python tools read it as str.
void write_str_attr(hid_t obj, const char* name, const std::string& v, const std::string& path) {
  Datatype type(H5Tcopy(H5T_C_S1));
  Dataspace space(H5Screate(H5S_SCALAR));
  if (!type || H5Tset_size(type.get(), H5T_VARIABLE) < 0 || H5Tset_cset(type.get(), H5T_CSET_UTF8) < 0)
    fail_h5(path, "cannot make a string type");
  Attribute a(H5Acreate2(obj, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT));
  const char* p = v.c_str();
  if (!a || H5Awrite(a.get(), type.get(), &p) < 0) fail_h5(path, std::string("writing attribute '") + name + "' failed");
}

File open_read_only(const std::string& path, const char* kind) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) fail(path, "no such file");
  if (std::filesystem::is_directory(path, ec)) fail(path, std::string("is a directory, not a ") + kind);
  PropList fapl(H5Pcreate(H5P_FILE_ACCESS));
  if (!fapl) fail_h5(path, "cannot create a file access property list");
#if H5_VERSION_GE(1, 10, 7)
  // Our files are immutable once renamed into place: locking buys nothing, and flock() fails
  // on some parallel file systems (HDF5_USE_FILE_LOCKING=FALSE otherwise).
  H5Pset_file_locking(fapl.get(), false, true);
#endif
  File f(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()));
  if (!f) fail_h5(path, "not an HDF5 file or truncated");
  return f;
}

// A scalar (or one-element) attribute, or DataError.
Attribute open_attr(hid_t obj, const char* name, const std::string& path) {
  const htri_t e = H5Aexists(obj, name);
  if (e < 0) fail_h5(path, std::string("cannot look up attribute '") + name + "'");
  if (e == 0) fail(path, std::string("missing attribute '") + name + "' (not a vchat file of this kind?)");
  Attribute a(H5Aopen(obj, name, H5P_DEFAULT));
  if (!a) fail_h5(path, std::string("cannot open attribute '") + name + "'");
  Dataspace space(H5Aget_space(a.get()));
  if (!space || H5Sget_simple_extent_npoints(space.get()) != 1)
    fail(path, std::string("attribute '") + name + "' must hold exactly one value");
  return a;
}

int64_t read_int_attr(hid_t obj, const char* name, const std::string& path) {
  Attribute a = open_attr(obj, name, path);
  Datatype type(H5Aget_type(a.get()));
  if (!type || H5Tget_class(type.get()) != H5T_INTEGER) fail(path, std::string("attribute '") + name + "' is not an integer");
  int64_t v = 0;
  if (H5Aread(a.get(), H5T_NATIVE_INT64, &v) < 0) fail_h5(path, std::string("reading attribute '") + name + "' failed");
  return v;
}

// Reads variable-length (h5py's default) and fixed-length strings alike.
std::string read_str_attr(hid_t obj, const char* name, const std::string& path) {
  Attribute a = open_attr(obj, name, path);
  Datatype type(H5Aget_type(a.get()));
  if (!type || H5Tget_class(type.get()) != H5T_STRING) fail(path, std::string("attribute '") + name + "' is not a string");
  const std::string err = std::string("reading attribute '") + name + "' failed";
  if (H5Tis_variable_str(type.get()) > 0) {
    Datatype mem(H5Tcopy(H5T_C_S1));
    if (!mem || H5Tset_size(mem.get(), H5T_VARIABLE) < 0 || H5Tset_cset(mem.get(), H5Tget_cset(type.get())) < 0)
      fail_h5(path, err);
    char* p = nullptr;
    if (H5Aread(a.get(), mem.get(), &p) < 0) fail_h5(path, err);
    std::string s = p ? p : "";
    H5free_memory(p);  // HDF5 allocated it; it must free it too
    return s;
  }
  const size_t n = H5Tget_size(type.get());
  std::string buf(n, '\0');
  if (n == 0 || H5Aread(a.get(), type.get(), buf.data()) < 0) fail_h5(path, err);
  buf.resize(std::strlen(buf.c_str()));  // NUL-terminated or NUL-padded
  if (H5Tget_strpad(type.get()) == H5T_STR_SPACEPAD) buf.erase(buf.find_last_not_of(' ') + 1);
  return buf;
}

}  // namespace vchat::data::h5
