// Source-dataset readers of vchat-prep (DESIGN.md §4.3, docs/DATA.md): LLaVA json,
// MIMIC-IT json (+ base64 image json) and a plain jsonl of interleaved rounds, each turned
// into Conversations (conversation.h) for the chat template.
//
// Two kinds of failure, kept apart on purpose:
//  - a file-level problem (missing/unreadable file, JSON syntax error, wrong top-level
//    shape) throws vchat::data::DataError naming the file (and line/column for syntax);
//    nothing of such a file can be trusted, so the run must stop.
//  - a bad record is returned as a SourceItem with `error` set: the converter skips it
//    and counts it under `reason` in report.json, so one bad record in a million does not
//    stop a prep run. Invalid UTF-8 bytes inside a record are a record error, not a file
//    error (the readers validate bytes themselves before handing them to the JSON parser).
//
// Readers do not open image files: a LLaVA/jsonl path that does not exist is found when the
// converter decodes it. MIMIC-IT images are inline, so an absent image id is found here.
#pragma once
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "conversation.h"

namespace vchat::prep {

// Why one record was skipped. `reason` is the key of report.json's skip counts:
//   malformed_record    wrong field types/shape, unparsable jsonl line, bad base64
//   empty_conversation  no turns / no rounds
//   no_answer           a question without a following (non-empty) answer, or an answer first
//   too_many_images     more than data::kMaxImagesPerSample images
//   non_utf8            bytes that are not valid UTF-8
//   missing_image       a MIMIC-IT image id absent from the images file
//   bad_image_count     "<image>" placeholders ≠ images given
// `message` names the file, the line (or byte offset) and the record id.
struct RecordError {
  std::string reason;
  std::string message;
};

// One record as read: a Conversation when `error` is empty; otherwise conv.id/origin are
// filled as far as known and the rest must not be used.
struct SourceItem {
  Conversation conv;
  std::optional<RecordError> error;
};

// LLaVA: a JSON list of {id, image: "rel/path" | images: [..], conversations: [{from, value}]}
// with from ∈ {"human", "gpt"}. Rounds are human→gpt pairs; each "<image>" in a human turn is
// one image, in order (stripped from the question with an adjacent "\n"; text trimmed). A
// single "image" without any placeholder belongs to the first round. Paths resolve against
// image_root; ImageRef.name is the path as written. conv.origin = "file:line" of the record.
std::vector<SourceItem> read_llava(const std::string& json_path, const std::string& image_root);

// MIMIC-IT: {"data": {id: {instruction, answer, image_ids: [..], rel_ins_ids: [..]}}} and an
// images file {image_id: base64}. Each id becomes one single-round conversation with all its
// images (ImageRef.encoded_bytes = decoded bytes, name = image id), in the file's order.
// conv.origin = "file:line" of the id's key.
std::vector<SourceItem> read_mimicit(const std::string& instruction_json, const std::string& images_json);

// jsonl: one {"id", "rounds": [{"images": [..] (optional), "question", "answer"}]} per line;
// blank lines are skipped; a line that is not JSON is a malformed_record (file:line:column).
std::vector<SourceItem> read_jsonl(const std::string& path, const std::string& image_root);

// Lower-case hex SHA-256 over the files' bytes, concatenated in the given order (the shard's
// `source_hash`). A file that cannot be read throws DataError naming it.
std::string hash_sources(const std::vector<std::string>& files);

// Byte offset of the first byte that does not start a well-formed UTF-8 sequence (Unicode
// Table 3-7: no overlongs, no surrogates, nothing above U+10FFFF, no truncated sequences),
// or std::string_view::npos when all of `s` is valid.
std::size_t find_invalid_utf8(std::string_view s);

// Standard base64 (RFC 4648 alphabet) to bytes. ASCII whitespace anywhere is ignored and
// missing '=' padding is tolerated; returns nullopt for anything else that is not base64.
std::optional<std::string> decode_base64(std::string_view text);

}  // namespace vchat::prep
