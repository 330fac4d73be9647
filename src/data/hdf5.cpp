#include "data/hdf5.h"

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
  const std::string e = last_error();
  return e.empty() ? std::string() : " (HDF5: " + e + ")";
}

}  // namespace vchat::data::h5
