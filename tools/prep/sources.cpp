// Source-dataset readers (see sources.h for the contract).
//
// How records keep their line numbers and their bad bytes: nlohmann::json refuses a whole
// document with one ill-formed UTF-8 byte, and gives no positions for values it parsed. So a
// json source is read as bytes, validated with our own strict UTF-8 check, and parsed from a
// copy in which each offending byte is replaced by '?' (same length, so offsets still hold).
// A small scanner over that (now valid) text finds where each top-level record starts; a
// record whose byte range held an offending byte is reported as non_utf8 with its line.
#include "sources.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "data/sample.h"

namespace vchat::prep {
namespace {

using nlohmann::json;
using nlohmann::ordered_json;
using data::DataError;
namespace fs = std::filesystem;

constexpr std::string_view kImagePlaceholder = "<image>";

// ---------------------------------------------------------------------------------------
// Bytes, lines, UTF-8

// A directory opens as a stream on Linux and fails later in odd ways: refuse it by name.
void check_not_directory(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw DataError(path + ": is a directory, expected a file");
}

std::string read_file(const std::string& path) {
  check_not_directory(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path + ": cannot open (" + std::strerror(errno) + ")");
  std::string bytes;
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) throw DataError(path + ": cannot read (not a regular file?)");
  bytes.resize(static_cast<size_t>(size));
  in.seekg(0, std::ios::beg);
  if (size > 0 && !in.read(bytes.data(), size)) throw DataError(path + ": read error");
  return bytes;
}

// Length of the well-formed UTF-8 sequence starting at p (Unicode Table 3-7), 0 if none.
// The second-byte ranges are what exclude overlongs (E0, F0), surrogates (ED) and code
// points above U+10FFFF (F4); C0, C1 and F5..FF never start a sequence.
size_t utf8_sequence_length(const unsigned char* p, size_t avail) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (avail < len) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t k = 2; k < len; ++k)
    if (p[k] < 0x80 || p[k] > 0xBF) return 0;
  return len;
}

// The text with every byte that starts no valid sequence replaced by '?', and their offsets
// (ascending). Replacing byte by byte keeps all offsets, and '?' inside a string is plain
// text while outside one it is still a syntax error.
struct SanitizedText {
  std::string text;
  std::vector<size_t> bad;
};

SanitizedText sanitize_utf8(std::string bytes) {
  SanitizedText out;
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    const size_t len = utf8_sequence_length(p + i, bytes.size() - i);
    if (len == 0) {
      out.bad.push_back(i);
      bytes[i] = '?';
      ++i;
    } else {
      i += len;
    }
  }
  out.text = std::move(bytes);
  return out;
}

// Line and column (both 1-based, column in bytes) of byte offsets in one text.
class LineIndex {
 public:
  explicit LineIndex(std::string_view s) {
    starts_.push_back(0);
    for (size_t i = 0; i < s.size(); ++i)
      if (s[i] == '\n') starts_.push_back(i + 1);
  }
  size_t line(size_t pos) const {
    return static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), pos) - starts_.begin());
  }
  size_t column(size_t pos) const { return pos - starts_[line(pos) - 1] + 1; }

 private:
  std::vector<size_t> starts_;  // offset of each line's first byte
};

// nlohmann's what() reads "[json.exception.parse_error.101] parse error at line 3, column 5:
// syntax error ..."; keep only the part after the position, which we print ourselves.
std::string parse_error_detail(const std::string& what) {
  const size_t col = what.find("column ");
  if (col != std::string::npos) {
    const size_t colon = what.find(": ", col);
    if (colon != std::string::npos) return what.substr(colon + 2);
  }
  return what;
}

// nlohmann's parse_error::byte counts the bytes read, so the offending byte is byte - 1.
size_t parse_error_offset(const nlohmann::json::parse_error& e, size_t text_size) {
  return std::min(e.byte > 0 ? e.byte - 1 : 0, text_size);
}

// Parses a whole sanitized document; a syntax error is a file error with line and column.
template <class Json>
Json parse_document(const SanitizedText& src, const LineIndex& lines, const std::string& path) {
  try {
    return Json::parse(src.text);
  } catch (const nlohmann::json::parse_error& e) {
    const size_t pos = parse_error_offset(e, src.text.size());
    // A byte we replaced sits outside any string: say so rather than "invalid literal '?'".
    const bool utf8 = std::binary_search(src.bad.begin(), src.bad.end(), pos);
    throw DataError(path + ": malformed JSON at line " + std::to_string(lines.line(pos)) + ", column " +
                    std::to_string(lines.column(pos)) + ": " +
                    (utf8 ? std::string("invalid UTF-8 byte outside a string") : parse_error_detail(e.what())));
  }
}

// ---------------------------------------------------------------------------------------
// Positions of records in a valid JSON text

constexpr size_t kNone = std::string::npos;

bool is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Offset just past the string literal starting at s[i] == '"'.
size_t skip_string(std::string_view s, size_t i) {
  for (size_t j = i + 1; j < s.size(); ++j) {
    if (s[j] == '\\')
      ++j;
    else if (s[j] == '"')
      return j + 1;
  }
  return s.size();
}

// Offset of the top-level value (after an optional BOM, which nlohmann skips too).
size_t top_value_offset(std::string_view s) {
  size_t i = s.substr(0, 3) == "\xEF\xBB\xBF" ? 3 : 0;
  while (i < s.size() && is_json_space(s[i])) ++i;
  return i;
}

// One direct child of an array or object: where its key (objects) and value start.
struct Child {
  size_t key = kNone, key_end = kNone;
  size_t value = kNone;
};

// The direct children of the container whose '[' or '{' is at s[open]. `s` must be valid
// JSON (nlohmann accepted it): the scan then only needs strings, nesting and separators.
std::vector<Child> children(std::string_view s, size_t open) {
  const bool object = s[open] == '{';
  enum class Want { kKey, kValue, kNothing };
  Want want = object ? Want::kKey : Want::kValue;
  std::vector<Child> out;
  Child cur;
  int depth = 1;
  // Marks a token starting at i on the container's own level.
  auto token_at = [&](size_t i, size_t end) {
    if (depth != 1) return;
    if (want == Want::kKey) {
      cur.key = i;
      cur.key_end = end;
    } else if (want == Want::kValue) {
      cur.value = i;
      out.push_back(cur);
      cur = Child{};
    }
    want = Want::kNothing;
  };
  for (size_t i = open + 1; i < s.size() && depth > 0;) {
    const char c = s[i];
    if (c == '"') {
      const size_t end = skip_string(s, i);
      token_at(i, end);
      i = end;
      continue;
    }
    if (c == '[' || c == '{') {
      token_at(i, kNone);
      ++depth;
    } else if (c == ']' || c == '}') {
      --depth;
    } else if (c == ',') {
      if (depth == 1) want = object ? Want::kKey : Want::kValue;
    } else if (c == ':') {
      if (depth == 1) want = Want::kValue;
    } else if (!is_json_space(c)) {
      token_at(i, kNone);  // a number or literal: only its first byte matters
    }
    ++i;
  }
  return out;
}

std::string decode_key(std::string_view s, const Child& c) {
  return json::parse(s.substr(c.key, c.key_end - c.key)).get<std::string>();
}

// ---------------------------------------------------------------------------------------
// Record checks

// Thrown inside one record's parsing; caught by the reader, which adds file, line and id.
struct BadRecord : std::runtime_error {
  BadRecord(std::string r, const std::string& what) : std::runtime_error(what), reason(std::move(r)) {}
  std::string reason;
};

std::string trim(std::string s) {
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  size_t b = 0, e = s.size();
  while (b < e && space(s[b])) ++b;
  while (e > b && space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

// Removes every "<image>" (with the "\n" after it, else the one before it, as LLaVA writes
// "<image>\nQ" or "Q\n<image>"), trims, and returns how many there were.
int strip_image_placeholders(std::string& q) {
  int n = 0;
  for (size_t pos; (pos = q.find(kImagePlaceholder)) != std::string::npos; ++n) {
    size_t b = pos, e = pos + kImagePlaceholder.size();
    if (e < q.size() && q[e] == '\n')
      ++e;
    else if (b > 0 && q[b - 1] == '\n')
      --b;
    q.erase(b, e - b);
  }
  q = trim(std::move(q));
  return n;
}

// Record ids are strings, sometimes numbers; an absent id falls back to the origin.
// (Templates: MIMIC-IT is read as ordered_json to keep the file's order.)
template <class Json>
std::string record_id(const Json& rec, const std::string& fallback) {
  if (!rec.is_object()) return fallback;
  auto it = rec.find("id");
  if (it == rec.end()) return fallback;
  if (it->is_string()) return it->template get<std::string>();
  if (it->is_number_integer()) return it->dump();
  return fallback;
}

template <class Json>
void check_id_type(const Json& rec) {
  auto it = rec.find("id");
  if (it != rec.end() && !it->is_string() && !it->is_number_integer())
    throw BadRecord("malformed_record", "\"id\" is neither a string nor an integer");
}

template <class Json>
const std::string& string_field(const Json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_string())
    throw BadRecord("malformed_record", where + "\"" + key + "\" is missing or not a string");
  return it->template get_ref<const std::string&>();
}

template <class Json>
std::vector<std::string> string_list(const Json& v, const std::string& what) {
  if (!v.is_array()) throw BadRecord("malformed_record", what + " is not a list");
  std::vector<std::string> out;
  for (const auto& e : v) {
    if (!e.is_string() || e.template get_ref<const std::string&>().empty())
      throw BadRecord("malformed_record", what + " holds an entry that is not a non-empty string");
    out.push_back(e.template get<std::string>());
  }
  return out;
}

void check_image_limit(size_t n) {
  if (n > static_cast<size_t>(data::kMaxImagesPerSample))
    throw BadRecord("too_many_images", std::to_string(n) + " images (at most " +
                                           std::to_string(data::kMaxImagesPerSample) + " per sample)");
}

std::string checked_answer(const std::string& raw, const std::string& where) {
  std::string a = trim(raw);
  if (a.empty()) throw BadRecord("no_answer", where + "the answer is empty");
  return a;
}

ImageRef image_file(const std::string& image_root, const std::string& rel) {
  ImageRef r;
  r.path = image_root.empty() ? rel : (fs::path(image_root) / rel).string();
  r.name = rel;
  return r;
}

std::string origin_of(const std::string& path, size_t line) { return path + ":" + std::to_string(line); }

RecordError record_error(const Conversation& c, std::string reason, const std::string& what) {
  return RecordError{std::move(reason), c.origin + ": record \"" + c.id + "\": " + what};
}

// If the byte range [begin, end) held an ill-formed UTF-8 byte, the error naming it.
std::optional<RecordError> utf8_error(const Conversation& c, const SanitizedText& src, const LineIndex& lines,
                                      size_t begin, size_t end) {
  auto it = std::lower_bound(src.bad.begin(), src.bad.end(), begin);
  if (it == src.bad.end() || *it >= end) return std::nullopt;
  return record_error(c, "non_utf8",
                      "invalid UTF-8 at line " + std::to_string(lines.line(*it)) + ", column " +
                          std::to_string(lines.column(*it)) + " (byte offset " + std::to_string(*it) + ")");
}

// ---------------------------------------------------------------------------------------
// LLaVA

void parse_llava_record(const json& rec, const std::string& image_root, Conversation& conv) {
  if (!rec.is_object()) throw BadRecord("malformed_record", "not a JSON object");
  check_id_type(rec);

  std::vector<std::string> images;
  bool single_image = false;  // "image": "path" (may lack its placeholder)
  const auto img = rec.find("image"), imgs = rec.find("images");
  const bool has_img = img != rec.end() && !img->is_null(), has_imgs = imgs != rec.end() && !imgs->is_null();
  if (has_img && has_imgs) throw BadRecord("malformed_record", "has both \"image\" and \"images\"");
  if (has_img) {
    if (!img->is_string() || img->get_ref<const std::string&>().empty())
      throw BadRecord("malformed_record", "\"image\" is not a non-empty string");
    images.push_back(img->get<std::string>());
    single_image = true;
  } else if (has_imgs) {
    images = string_list(*imgs, "\"images\"");
  }

  const auto turns = rec.find("conversations");
  if (turns == rec.end() || !turns->is_array())
    throw BadRecord("malformed_record", "\"conversations\" is missing or not a list");
  if (turns->empty()) throw BadRecord("empty_conversation", "\"conversations\" is empty");

  // Pair human→gpt turns; anything else leaves a question without its answer.
  std::optional<std::string> question;
  int placeholders = 0;
  for (size_t t = 0; t < turns->size(); ++t) {
    const json& turn = (*turns)[t];
    const std::string where = "conversations[" + std::to_string(t) + "]: ";
    if (!turn.is_object()) throw BadRecord("malformed_record", where + "not a JSON object");
    const std::string& from = string_field(turn, "from", where);
    const std::string& value = string_field(turn, "value", where);
    if (from == "human") {
      if (question) throw BadRecord("no_answer", where + "a human turn follows a human turn without a gpt answer");
      question = value;
    } else if (from == "gpt") {
      if (!question) throw BadRecord("no_answer", where + "a gpt turn without a preceding human question");
      Round r;
      r.question = std::move(*question);
      question.reset();
      r.n_images = strip_image_placeholders(r.question);
      placeholders += r.n_images;
      r.answer = checked_answer(value, where);
      conv.rounds.push_back(std::move(r));
    } else {
      throw BadRecord("malformed_record", where + "unknown speaker \"" + from + "\" (expected human or gpt)");
    }
  }
  if (question)
    throw BadRecord("no_answer", "conversations[" + std::to_string(turns->size() - 1) +
                                     "]: the last human turn has no gpt answer");

  check_image_limit(std::max(images.size(), static_cast<size_t>(placeholders)));
  if (placeholders == 0 && single_image) {
    conv.rounds.front().n_images = 1;  // LLaVA sometimes omits "<image>": the image opens the chat
  } else if (static_cast<size_t>(placeholders) != images.size()) {
    throw BadRecord("bad_image_count", std::to_string(placeholders) + " <image> placeholders but " +
                                           std::to_string(images.size()) + " images");
  }
  for (const auto& rel : images) conv.images.push_back(image_file(image_root, rel));
}

// ---------------------------------------------------------------------------------------
// MIMIC-IT images: only the ids the instructions use are kept, so a multi-GB base64 file
// never becomes a DOM. A SAX handler collects {id: string} at the top level.

struct ImageIndexSax {
  const std::unordered_set<std::string>* wanted = nullptr;  // ids the instructions reference
  std::unordered_map<std::string, std::string> found;       // id -> base64 text
  std::unordered_set<std::string> not_string;               // ids whose value is not a string
  int depth = 0;
  bool top_is_object = false;
  std::string current_key;  // the last key seen at the top level
  std::size_t error_offset = 0;
  std::string error_what;

  // A scalar or container start at depth 1 is the value of `key`.
  void top_value(bool is_string, std::string* s) {
    if (depth != 1 || !wanted->count(current_key)) return;
    if (is_string) {
      found[current_key] = std::move(*s);
      not_string.erase(current_key);
    } else {
      found.erase(current_key);
      not_string.insert(current_key);
    }
  }
  bool null() { return top_value(false, nullptr), true; }
  bool boolean(bool) { return top_value(false, nullptr), true; }
  bool number_integer(json::number_integer_t) { return top_value(false, nullptr), true; }
  bool number_unsigned(json::number_unsigned_t) { return top_value(false, nullptr), true; }
  bool number_float(json::number_float_t, const std::string&) { return top_value(false, nullptr), true; }
  bool string(std::string& s) { return top_value(true, &s), true; }
  bool binary(json::binary_t&) { return top_value(false, nullptr), true; }
  bool start_object(std::size_t) {
    if (depth == 0) top_is_object = true;
    top_value(false, nullptr);
    ++depth;
    return true;
  }
  bool end_object() { return --depth, true; }
  bool start_array(std::size_t) {
    top_value(false, nullptr);
    ++depth;
    return true;
  }
  bool end_array() { return --depth, true; }
  bool key(std::string& k) {
    if (depth == 1) current_key = k;
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& ex) {
    error_offset = position;
    error_what = ex.what();
    return false;
  }
};

// Line and column of a byte offset, reading the file again (only on an error).
std::pair<size_t, size_t> line_col_in_file(const std::string& path, size_t offset) {
  std::ifstream in(path, std::ios::binary);
  size_t line = 1, col = 1;
  char c;
  for (size_t i = 0; i < offset && in.get(c); ++i) {
    if (c == '\n') {
      ++line;
      col = 1;
    } else {
      ++col;
    }
  }
  return {line, col};
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Public API

std::size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size();) {
    const size_t len = utf8_sequence_length(p + i, s.size() - i);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::optional<std::string> decode_base64(std::string_view text) {
  std::string b64;
  b64.reserve(text.size());
  for (char c : text)
    if (!(c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v')) b64.push_back(c);
  // EVP_DecodeBlock wants whole 4-character groups and is lax about '=' in the middle, so
  // the alphabet and the padding are checked here; missing padding is restored.
  size_t pad = 0;
  while (pad < b64.size() && b64[b64.size() - 1 - pad] == '=') ++pad;
  if (pad > 2) return std::nullopt;
  for (size_t i = 0; i + pad < b64.size(); ++i) {
    const char c = b64[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '/'))
      return std::nullopt;
  }
  if (b64.size() % 4 == 1) return std::nullopt;
  if (pad > 0 && b64.size() % 4 != 0) return std::nullopt;  // padding that does not complete a group
  while (b64.size() % 4 != 0) {
    b64.push_back('=');
    ++pad;
  }
  if (b64.empty()) return std::string();
  std::string out(b64.size() / 4 * 3, '\0');
  const int n = EVP_DecodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(b64.data()), static_cast<int>(b64.size()));
  if (n < 0) return std::nullopt;
  // EVP_DecodeBlock always writes 3 bytes per group: each '=' stands for one byte too many.
  out.resize(static_cast<size_t>(n) - pad);
  return out;
}

std::string hash_sources(const std::vector<std::string>& files) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw DataError("SHA-256: OpenSSL init failed");
  std::vector<char> buf(1 << 20);
  for (const auto& path : files) {
    check_not_directory(path);
    std::ifstream in(path, std::ios::binary);
    if (!in) throw DataError(path + ": cannot open for hashing (" + std::strerror(errno) + ")");
    while (in) {
      in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
      if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(in.gcount()));
    }
    if (in.bad()) throw DataError(path + ": read error while hashing");
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), md, &len) != 1) throw DataError("SHA-256: OpenSSL final failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(hex[md[i] >> 4]);
    out.push_back(hex[md[i] & 15]);
  }
  return out;
}

std::vector<SourceItem> read_llava(const std::string& json_path, const std::string& image_root) {
  const SanitizedText src = sanitize_utf8(read_file(json_path));
  const LineIndex lines(src.text);
  const json top = parse_document<json>(src, lines, json_path);
  if (!top.is_array())
    throw DataError(json_path + ": expected a JSON list of LLaVA records, found a JSON " + top.type_name());
  const std::vector<Child> at = children(src.text, top_value_offset(src.text));
  if (at.size() != top.size())  // cannot happen for text nlohmann accepted; guards the scanner
    throw DataError(json_path + ": internal error locating records (" + std::to_string(at.size()) + " vs " +
                    std::to_string(top.size()) + ")");

  std::vector<SourceItem> out;
  out.reserve(top.size());
  for (size_t k = 0; k < top.size(); ++k) {
    SourceItem item;
    Conversation& c = item.conv;
    const size_t begin = at[k].value, end = k + 1 < at.size() ? at[k + 1].value : src.text.size();
    c.origin = origin_of(json_path, lines.line(begin));
    c.id = record_id(top[k], c.origin);
    item.error = utf8_error(c, src, lines, begin, end);
    if (!item.error) {
      try {
        parse_llava_record(top[k], image_root, c);
      } catch (const BadRecord& e) {
        item.error = record_error(c, e.reason, e.what());
      }
    }
    out.push_back(std::move(item));
  }
  return out;
}

std::vector<SourceItem> read_mimicit(const std::string& instruction_json, const std::string& images_json) {
  const SanitizedText src = sanitize_utf8(read_file(instruction_json));
  const LineIndex lines(src.text);
  const ordered_json top = parse_document<ordered_json>(src, lines, instruction_json);
  if (!top.is_object() || !top.contains("data") || !top["data"].is_object())
    throw DataError(instruction_json + ": expected a MIMIC-IT instruction file {\"data\": {id: record, ...}}");
  const ordered_json& records = top["data"];

  // Where each id's key is (for origins and byte ranges). With a duplicated key nlohmann
  // keeps the last value, so the last position wins here too.
  std::unordered_map<std::string, std::pair<size_t, size_t>> where;  // id -> [begin, end)
  {
    size_t data_at = kNone;
    for (const Child& ch : children(src.text, top_value_offset(src.text)))
      if (decode_key(src.text, ch) == "data") data_at = ch.value;
    const std::vector<Child> at = children(src.text, data_at);
    for (size_t k = 0; k < at.size(); ++k) {
      const size_t end = k + 1 < at.size() ? at[k + 1].key : src.text.size();
      where[decode_key(src.text, at[k])] = {at[k].key, end};
    }
  }

  // The image ids that matter, then one streaming pass over the images file.
  std::unordered_set<std::string> wanted;
  for (const auto& [id, rec] : records.items()) {
    auto ids = rec.is_object() ? rec.find("image_ids") : rec.end();
    if (rec.is_object() && ids != rec.end() && ids->is_array())
      for (const auto& v : *ids)
        if (v.is_string()) wanted.insert(v.get<std::string>());
  }
  ImageIndexSax sax;
  sax.wanted = &wanted;
  {
    check_not_directory(images_json);
    std::ifstream in(images_json, std::ios::binary);
    if (!in) throw DataError(images_json + ": cannot open (" + std::strerror(errno) + ")");
    if (!json::sax_parse(in, &sax)) {
      const size_t pos = sax.error_offset > 0 ? sax.error_offset - 1 : 0;
      const auto [line, col] = line_col_in_file(images_json, pos);
      throw DataError(images_json + ": malformed JSON at line " + std::to_string(line) + ", column " +
                      std::to_string(col) + ": " + parse_error_detail(sax.error_what));
    }
    if (!sax.top_is_object) throw DataError(images_json + ": expected a JSON object {image_id: base64, ...}");
  }

  std::vector<SourceItem> out;
  out.reserve(records.size());
  for (const auto& [id, rec] : records.items()) {
    SourceItem item;
    Conversation& c = item.conv;
    const auto [begin, end] = where.at(id);
    c.id = id;
    c.origin = origin_of(instruction_json, lines.line(begin));
    item.error = utf8_error(c, src, lines, begin, end);
    if (!item.error) {
      try {
        if (!rec.is_object()) throw BadRecord("malformed_record", "not a JSON object");
        Round r;
        r.question = trim(string_field(rec, "instruction", ""));
        r.answer = checked_answer(string_field(rec, "answer", ""), "");
        const auto ids = rec.find("image_ids");
        const std::vector<std::string> image_ids =
            ids == rec.end() ? std::vector<std::string>{} : string_list(*ids, "\"image_ids\"");
        check_image_limit(image_ids.size());
        for (const auto& image_id : image_ids) {
          if (sax.not_string.count(image_id))
            throw BadRecord("malformed_record", "image id \"" + image_id + "\" in " + images_json + " is not a string");
          auto it = sax.found.find(image_id);
          if (it == sax.found.end())
            throw BadRecord("missing_image", "image id \"" + image_id + "\" is not in " + images_json);
          std::optional<std::string> bytes = decode_base64(it->second);
          if (!bytes) throw BadRecord("malformed_record", "image id \"" + image_id + "\" is not valid base64");
          ImageRef ref;
          ref.encoded_bytes = std::move(*bytes);
          ref.name = image_id;
          c.images.push_back(std::move(ref));
        }
        r.n_images = static_cast<int>(image_ids.size());
        c.rounds.push_back(std::move(r));
      } catch (const BadRecord& e) {
        item.error = record_error(c, e.reason, e.what());
      }
    }
    out.push_back(std::move(item));
  }
  return out;
}

std::vector<SourceItem> read_jsonl(const std::string& path, const std::string& image_root) {
  check_not_directory(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError(path + ": cannot open (" + std::strerror(errno) + ")");
  std::vector<SourceItem> out;
  std::string line;
  for (size_t lineno = 1; std::getline(in, line); ++lineno) {
    if (lineno == 1 && line.compare(0, 3, "\xEF\xBB\xBF") == 0) line.erase(0, 3);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (trim(line).empty()) continue;

    SourceItem item;
    Conversation& c = item.conv;
    c.origin = origin_of(path, lineno);
    c.id = c.origin;  // until the record names itself
    try {
      if (const size_t bad = find_invalid_utf8(line); bad != std::string_view::npos) {
        // Name the record if the line is JSON once the bad bytes are masked.
        const json masked = json::parse(sanitize_utf8(line).text, nullptr, /*allow_exceptions=*/false);
        c.id = record_id(masked, c.origin);
        throw BadRecord("non_utf8", "invalid UTF-8 at column " + std::to_string(bad + 1));
      }
      json rec;
      try {
        rec = json::parse(line);
      } catch (const json::parse_error& e) {
        throw BadRecord("malformed_record", "not valid JSON at column " +
                                                std::to_string(parse_error_offset(e, line.size()) + 1) + ": " +
                                                parse_error_detail(e.what()));
      }
      c.id = record_id(rec, c.origin);
      if (!rec.is_object()) throw BadRecord("malformed_record", "not a JSON object");
      check_id_type(rec);
      const auto rounds = rec.find("rounds");
      if (rounds == rec.end() || !rounds->is_array())
        throw BadRecord("malformed_record", "\"rounds\" is missing or not a list");
      if (rounds->empty()) throw BadRecord("empty_conversation", "\"rounds\" is empty");
      for (size_t k = 0; k < rounds->size(); ++k) {
        const json& jr = (*rounds)[k];
        const std::string where = "rounds[" + std::to_string(k) + "]: ";
        if (!jr.is_object()) throw BadRecord("malformed_record", where + "not a JSON object");
        Round r;
        r.question = trim(string_field(jr, "question", where));
        const auto a = jr.find("answer");
        if (a == jr.end() || a->is_null()) throw BadRecord("no_answer", where + "no \"answer\"");
        r.answer = checked_answer(string_field(jr, "answer", where), where);
        if (auto im = jr.find("images"); im != jr.end() && !im->is_null()) {
          for (const auto& rel : string_list(*im, where + "\"images\"")) c.images.push_back(image_file(image_root, rel));
          r.n_images = static_cast<int>(im->size());
        }
        c.rounds.push_back(std::move(r));
      }
      check_image_limit(c.images.size());
    } catch (const BadRecord& e) {
      item.error = record_error(c, e.reason, e.what());
    }
    out.push_back(std::move(item));
  }
  if (in.bad()) throw DataError(path + ": read error");
  return out;
}

}  // namespace vchat::prep
