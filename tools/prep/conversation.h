// A source record after parsing, before tokenization: what every source reader (LLaVA,
// MIMIC-IT, jsonl) produces and what the chat template (DESIGN.md §4.1) consumes.
#pragma once
#include <string>
#include <vector>

namespace vchat::prep {

// One image reference: a path to decode (LLaVA, jsonl) or encoded bytes (MIMIC-IT base64).
struct ImageRef {
  std::string path;           // resolved path, empty when bytes are given
  std::string encoded_bytes;  // raw file bytes (PNG/JPEG...), empty when path is given
  std::string name;           // for messages: the path or the image id
};

struct Round {
  int n_images = 0;  // images shown in this round, before its question
  std::string question;
  std::string answer;
};

struct Conversation {
  std::string id;      // record id, named in every error about it
  std::string origin;  // "file:line" or "file:offset", for messages
  std::vector<ImageRef> images;  // all images, in order; Σ rounds[i].n_images == images.size()
  std::vector<Round> rounds;
};

}  // namespace vchat::prep
