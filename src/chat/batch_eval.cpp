#include "chat/batch_eval.h"

#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>

#include "data/manifest.h"
#include "data/sample.h"

namespace vchat::chat {

namespace fs = std::filesystem;
using nlohmann::json;

std::string normalize_answer(const std::string& s) {
  std::string t;
  for (unsigned char c : s) {
    if (std::ispunct(c)) continue;
    t += static_cast<char>(std::tolower(c));
  }
  std::istringstream words(t);
  std::string w, out;
  while (words >> w)
    if (w != "a" && w != "an" && w != "the") out += (out.empty() ? "" : " ") + w;
  return out;
}

double token_f1(const std::string& prediction, const std::string& reference) {
  auto words = [](const std::string& s) {
    std::map<std::string, int> m;
    std::istringstream in(normalize_answer(s));
    for (std::string w; in >> w;) ++m[w];
    return m;
  };
  const auto p = words(prediction), r = words(reference);
  int np = 0, nr = 0, common = 0;
  for (const auto& [w, c] : p) np += c;
  for (const auto& [w, c] : r) nr += c;
  for (const auto& [w, c] : p)
    if (auto it = r.find(w); it != r.end()) common += std::min(c, it->second);
  if (np == 0 || nr == 0) return np == nr ? 1.0 : 0.0;
  if (common == 0) return 0.0;
  const double precision = static_cast<double>(common) / np, recall = static_cast<double>(common) / nr;
  return 2 * precision * recall / (precision + recall);
}

namespace {

// One line's work; throws ChatError / std::invalid_argument with what is wrong.
json run_line(ChatSession& session, const json& j, const std::string& root, BatchReport& rep) {
  if (!j.is_object()) throw std::invalid_argument("not a JSON object");
  json out = {{"id", j.value("id", json())}};
  if (j.contains("prompt_ids")) {
    const auto ids = j.at("prompt_ids").get<std::vector<int32_t>>();
    const int max_new = j.value("max_new_tokens", session.max_new_tokens());
    if (max_new <= 0) throw std::invalid_argument("max_new_tokens must be > 0");
    out["output_ids"] = session.generate_ids(ids, max_new);
    return out;
  }
  if (!j.contains("rounds") || !j["rounds"].is_array() || j["rounds"].empty())
    throw std::invalid_argument("needs \"rounds\" (a non-empty list) or \"prompt_ids\"");
  // Every round's images exist before any generation: a bad line costs no compute.
  int total_images = 0;
  for (const json& r : j["rounds"]) {
    if (!r.is_object() || !r.contains("question") || !r["question"].is_string())
      throw std::invalid_argument("every round needs a \"question\" string");
    for (const json& im : r.value("images", json::array())) {
      const fs::path p = fs::path(root) / im.get<std::string>();
      if (!fs::exists(p)) throw ChatError("image " + p.string() + ": missing");
      ++total_images;
    }
  }
  if (total_images > kMaxImagesPerConversation)
    throw ChatError(std::to_string(total_images) + " images, more than " + std::to_string(kMaxImagesPerConversation) +
                    " per conversation");
  session.clear();
  BatchReport line;  // counted into `rep` only when the whole line ran
  json rounds = json::array();
  for (const json& r : j["rounds"]) {
    std::vector<std::string> images;
    for (const json& im : r.value("images", json::array())) images.push_back((fs::path(root) / im.get<std::string>()).string());
    const Answer a = session.ask(r["question"].get<std::string>(), images);
    json o = {{"question", r["question"]}, {"answer", a.text}};
    if (!images.empty()) o["images"] = r["images"];
    if (r.contains("answer") && r["answer"].is_string()) {
      const std::string ref = r["answer"].get<std::string>();
      const bool exact = normalize_answer(a.text) == normalize_answer(ref);
      const double f1 = token_f1(a.text, ref);
      o["reference"] = ref;
      o["exact"] = exact;
      o["f1"] = f1;
      ++line.scored;
      line.exact += exact;
      line.f1_sum += f1;
    }
    rounds.push_back(std::move(o));
  }
  out["rounds"] = std::move(rounds);
  rep.scored += line.scored;
  rep.exact += line.exact;
  rep.f1_sum += line.f1_sum;
  return out;
}

}  // namespace

BatchReport run_batch(ChatSession& session, const std::string& in_path, const std::string& out_path,
                      const std::string& image_root, std::ostream& log) {
  std::ifstream in(in_path);
  if (!in) throw data::DataError(in_path + ": cannot open");
  const std::string root = image_root.empty() ? fs::absolute(in_path).parent_path().string() : image_root;
  std::string out_text, line;
  BatchReport rep;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    ++rep.lines;
    json j, result;
    try {
      j = json::parse(line);
      result = run_line(session, j, root, rep);
    } catch (const std::exception& e) {
      ++rep.failed;
      const std::string where = in_path + ":" + std::to_string(n);
      log << "vchat-chat: " << where << ": " << e.what() << " (line skipped)\n";
      result = {{"id", j.is_object() ? j.value("id", json()) : json()}, {"line", n}, {"error", e.what()}};
    }
    out_text += result.dump() + "\n";
  }
  data::write_file_atomic(out_path, out_text);
  return rep;
}

}  // namespace vchat::chat
